"""What Gemma changes at the two ends of the decoder, as hooks on a built ``GPTModel`` chunk.

- The input embeddings are multiplied by ``sqrt(hidden_size)`` rounded to the model dtype, as
  transformers' ``Gemma*ScaledWordEmbedding`` computes it (``DecoderShape.embedding_scale``).
- The output logits are soft-capped, ``cap · tanh(logits / cap)`` (Gemma 2's ``final_logit_softcapping``),
  before Megatron-Core's loss or anything else that reads them.

Hooks, so that everything else (pipeline stages, tied embeddings, the loss) is Megatron-Core's own.
"""

from __future__ import annotations

import math

import torch

from bridge.megatron.layers.decoder_shape import DecoderShape


def apply_model_ends(chunk: torch.nn.Module, shape: DecoderShape, hidden_size: int) -> None:
    """Hook the embedding scale and the final logit cap of ``shape`` onto this chunk's embedding / output layer (where it has them)."""
    embedding = getattr(chunk, "embedding", None)
    if shape.embedding_scale and embedding is not None:
        scale = math.sqrt(hidden_size)
        embedding.register_forward_hook(lambda _m, _args, out: out * torch.tensor(scale, dtype=out.dtype, device=out.device))
    output_layer = getattr(chunk, "output_layer", None)
    if shape.final_logit_softcap and output_layer is not None:
        cap = shape.final_logit_softcap
        output_layer.register_forward_hook(lambda _m, _args, out: (torch.tanh(out[0] / cap) * cap, *out[1:]))
