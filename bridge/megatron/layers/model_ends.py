"""What the bridge changes at the two ends of the decoder, as hooks on a built ``GPTModel`` chunk.

- The input embeddings are multiplied by ``sqrt(hidden_size)`` rounded to the model dtype, as
  transformers' ``Gemma*ScaledWordEmbedding`` computes it (``DecoderShape.embedding_scale``).
- The output logits are soft-capped, ``cap · tanh(logits / cap)`` (Gemma 2's ``final_logit_softcapping``),
  before Megatron-Core's loss or anything else that reads them.
- Megatron-Core's loss (``compute_language_model_loss``, for the output layer and each multi-token-prediction
  head) sees the vocabulary padding's columns as -inf: the padded rows, absent from the HF model, take no
  probability and get no gradient (``mask_vocab_padding_in_loss``).

Hooks, so that everything else (pipeline stages, tied embeddings, the loss) is Megatron-Core's own.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state

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


def mask_vocab_padding_in_loss(chunk: torch.nn.Module, vocab_size: int) -> None:
    """Make this chunk's ``compute_language_model_loss`` ignore the vocabulary rows past ``vocab_size``.

    Megatron-Core pads the vocabulary (``make_vocab_size_divisible_by`` × TP) and its cross entropy
    would spread probability onto the padding; the logits (this TP rank's slice of the padded vocabulary)
    get -inf there first.
    """
    if not hasattr(chunk, "compute_language_model_loss"):
        return
    loss_over_padded_vocab = chunk.compute_language_model_loss

    def loss(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        local = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * local
        if start + local > vocab_size:
            padding = torch.arange(start, start + local, device=logits.device) >= vocab_size
            logits = logits.float().masked_fill(padding, float("-inf"))
        return loss_over_padded_vocab(labels, logits)

    chunk.compute_language_model_loss = loss
