"""Megatron-Core's multi-latent attention (DeepSeek-V2/V3) on its local modules, without Transformer Engine.

Measured on megatron-core 0.16.1: the local spec's ``MLASelfAttention`` builds and runs (CPU and GPU
alike) once two things are set right, which ``local_mla_spec`` does:

1. Its core attention gets ``k_channels`` and ``v_channels`` (the q/k head dim is ``qk_head_dim +
   qk_pos_emb_head_dim``, the value head dim ``v_head_dim``), which the local ``DotProductAttention``
   does not take; without them: ``TypeError: ... unexpected keyword argument 'k_channels'``. Its
   output is sized by the value head dim (``MLADotProductAttention``); without that a model whose
   ``v_head_dim × heads`` is not the hidden size (DeepSeek-V3: 128 × 128 against 7168) fails to
   reshape its output. MLA passes its own softmax scale (YaRN's mscale included).
2. ``multi_latent_attention.py`` tests ``isinstance(self.linear_proj, TELinear)``; without Transformer
   Engine that name is a ``MagicMock`` instance and ``isinstance`` raises ``TypeError``. It is
   replaced by a class nothing is an instance of (``_NoTransformerEngineLinear``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.utils import divide


class MLADotProductAttention(DotProductAttention):
    """The local ``DotProductAttention`` with MLA's ``k_channels``/``v_channels``: output sized by the value heads."""

    def __init__(self, *args: Any, k_channels: int | None = None, v_channels: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_attention_head = v_channels
            self.hidden_size_per_partition = divide(v_channels * self.config.num_attention_heads, self.pg_collection.tp.size())
        if kwargs.get("softmax_scale") is None and k_channels is not None:
            self.softmax_scale = k_channels**-0.5


class _NoTransformerEngineLinear:
    """Stands for Transformer Engine's ``TELinear`` where TE is missing: nothing is an instance of it."""


def local_mla_spec(block: TransformerBlockSubmodules) -> TransformerBlockSubmodules:
    """A copy of a local-spec decoder ``block`` whose MLA layers use ``MLADotProductAttention`` (see the module's notes)."""
    from megatron.core.transformer import multi_latent_attention

    if not isinstance(multi_latent_attention.TELinear, type):
        multi_latent_attention.TELinear = _NoTransformerEngineLinear
    layers = []
    for layer in block.layer_specs:
        attention = layer.submodules.self_attention
        if isinstance(attention, ModuleSpec) and issubclass(attention.module, multi_latent_attention.MLASelfAttention):
            inner = dataclasses.replace(attention.submodules, core_attention=MLADotProductAttention)
            attention = dataclasses.replace(attention, submodules=inner)
            layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, self_attention=attention))
        layers.append(layer)
    return dataclasses.replace(block, layer_specs=layers)
