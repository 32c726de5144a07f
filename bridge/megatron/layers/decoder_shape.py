"""``DecoderShape``: how a family's decoder differs from Megatron-Core's pre-norm GPT model.

A model bridge declares it (``ModelBridge.decoder_shape``); the builder edits Megatron-Core's layer
spec to match (``bridge.megatron.layers.spec``). Kept free of Megatron-Core imports so that model
modules stay declarations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class DecoderShape:
    """The switches of a decoder beyond Llama's: of its layers, then of its two ends.

    ``pre_norms``: a norm before attention and before the MLP (Llama); OLMo-2 has none.
    ``post_norms``: a norm on the attention output and on the MLP output, before each residual add
    (OLMo-2, Gemma 2/3).
    ``qk_norm``: ``"head"``, Megatron-Core's q/k norm over each head (Qwen3); ``"projection"``, one
    norm over all heads of the q (and of the k) projection, each TP rank normalising its heads with
    the mean square all-reduced over TP (OLMo-2, OLMoE). Only read when the config turns q/k norms on.
    ``sliding_rope_base``: the rope base of the layers with a sliding window (Gemma 3's local layers);
    the others use the model's rotary embedding.
    ``attn_logit_softcap``: attention scores capped as ``cap · tanh(scores / cap)`` (Gemma 2).
    ``embedding_scale``: input embeddings multiplied by ``sqrt(hidden_size)`` in the model dtype (Gemma).
    ``final_logit_softcap``: output logits capped the same way (Gemma 2).
    """

    pre_norms: bool = True
    post_norms: bool = False
    qk_norm: Literal["head", "projection"] = "head"
    sliding_rope_base: float | None = None
    attn_logit_softcap: float | None = None
    embedding_scale: bool = False
    final_logit_softcap: float | None = None

    @property
    def is_megatron_default(self) -> bool:
        """Megatron-Core's own spec builds this decoder (Transformer Engine's, on a GPU that has it)."""
        return self == DecoderShape()
