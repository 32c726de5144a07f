"""Attention variants of Gemma 2/3 on Megatron-Core's local modules.

- ``SlidingRopeSelfAttention``: the layers with a sliding window rotate q and k with their own rope
  base (Gemma 3's ``rope_local_base_freq``, its ``sliding_attention`` rope parameters); the other
  layers use the model's rotary embedding. Which layers slide is Megatron-Core's own rule
  (``window_size`` with ``window_attn_skip_freq``), the one its attention masks with.
- ``SoftCappedDotProductAttention``: attention scores capped as ``cap · tanh(scores / cap)`` after
  the softmax scale and before masking and softmax (Gemma 2's ``attn_logit_softcapping``).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.utils import is_layer_window_attention


class SlidingRopeSelfAttention(SelfAttention):
    """``SelfAttention`` whose windowed layers use a rotary embedding of base ``sliding_rope_base``."""

    def __init__(self, config, submodules, layer_number: int, *args: Any, sliding_rope_base: float, **kwargs: Any):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.sliding_rotary = None
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, self.layer_number):
            self.sliding_rotary = RotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=1.0,
                rotary_base=sliding_rope_base,
                use_cpu_initialization=config.use_cpu_initialization,
            )

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, *args: Any, rotary_pos_emb=None, **kwargs: Any):
        if self.sliding_rotary is not None and isinstance(rotary_pos_emb, torch.Tensor):
            rotary_pos_emb = self.sliding_rotary(rotary_pos_emb.shape[0])  # the same positions, this layer's base
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)


class _SoftCappedScores(torch.nn.Module):
    """Megatron-Core's scale-mask-softmax applied to ``cap · tanh(scores / cap)``."""

    def __init__(self, softmax: torch.nn.Module, cap: float):
        super().__init__()
        self.softmax, self.cap = softmax, cap

    def forward(self, scores: torch.Tensor, mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.softmax(torch.tanh(scores / self.cap) * self.cap, mask, *args, **kwargs)


class SoftCappedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` with its attention scores soft-capped at ``softcap``."""

    def __init__(self, *args: Any, softcap: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.scale_mask_softmax = _SoftCappedScores(self.scale_mask_softmax, softcap)
