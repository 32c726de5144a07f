"""``YarnTransformerConfig``: a ``TransformerConfig`` with the YaRN fields Megatron-Core's GPTModel reads.

Megatron-Core 0.16's ``GPTModel(position_embedding_type="yarn")`` and its attention read
``config.yarn_*`` with ``getattr`` (rotary frequencies, and the cos/sin scale the attention applies),
but ``TransformerConfig`` declares none of them; a dataclass that does lets a converted model use
YaRN. ``yarn_mscale``/``yarn_mscale_all_dim`` None: the scale is ``0.1·ln(factor) + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer import TransformerConfig


@dataclass
class YarnTransformerConfig(TransformerConfig):
    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: Optional[float] = None
    yarn_mscale_all_dim: Optional[float] = None
    yarn_correction_range_round_to_int: bool = True
