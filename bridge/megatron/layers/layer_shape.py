"""``LayerShape``: how a family's decoder layer differs from Megatron-Core's pre-norm GPT layer.

A model bridge declares it (``ModelBridge.layer_shape``); the builder edits Megatron-Core's layer
spec to match (``bridge.megatron.layers.spec``). Kept free of Megatron-Core imports so that model
modules stay declarations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LayerShape:
    """The switches of a decoder layer beyond Llama's.

    ``pre_norms``: a norm before attention and before the MLP (Llama); OLMo-2 has none.
    ``post_norms``: a norm on the attention output and on the MLP output, before each residual add
    (OLMo-2, Gemma 2/3).
    ``qk_norm``: ``"head"``, Megatron-Core's q/k norm over each head (Qwen3); ``"projection"``, one
    norm over all heads of the q (and of the k) projection, whose weight TP splits with the heads
    (OLMo-2, OLMoE). Only read when the config turns q/k norms on.
    """

    pre_norms: bool = True
    post_norms: bool = False
    qk_norm: Literal["head", "projection"] = "head"

    @property
    def is_megatron_default(self) -> bool:
        """Megatron-Core's own spec builds this layer (Transformer Engine's, on a GPU that has it)."""
        return self == LayerShape()
