"""Editing Megatron-Core's local GPT layer specs to the ``LayerShape`` a model bridge declares."""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from bridge.megatron.layers.layer_shape import LayerShape
from bridge.megatron.layers.post_norm_layer import PostNormLayerSubmodules, PostNormTransformerLayer
from bridge.megatron.layers.projection_norm import ProjectionRMSNorm


def apply_layer_shape(block: TransformerBlockSubmodules, shape: LayerShape) -> TransformerBlockSubmodules:
    """A copy of a local-spec decoder ``block`` whose layers have ``shape``; norms added are of the block's final norm's kind."""
    if shape.is_megatron_default:
        return block
    layers = [_layer_spec(layer, shape, block.layer_norm) for layer in block.layer_specs]
    return dataclasses.replace(block, layer_specs=layers)


def _layer_spec(layer: ModuleSpec, shape: LayerShape, norm: ModuleSpec | type) -> ModuleSpec:
    sub = layer.submodules
    attention = sub.self_attention
    if shape.qk_norm == "projection" and attention.submodules.q_layernorm not in (None, IdentityOp):
        qk = dataclasses.replace(
            attention.submodules,
            q_layernorm=ModuleSpec(module=ProjectionRMSNorm, params={"role": "query"}),
            k_layernorm=ModuleSpec(module=ProjectionRMSNorm, params={"role": "key"}),
        )
        attention = dataclasses.replace(attention, submodules=qk)
    changes = {"self_attention": attention}
    if not shape.pre_norms:
        changes.update(input_layernorm=IdentityOp, pre_mlp_layernorm=IdentityOp)
    if not shape.post_norms:
        return dataclasses.replace(layer, submodules=dataclasses.replace(sub, **changes))
    fields = {f.name: getattr(sub, f.name) for f in dataclasses.fields(sub)}
    post = PostNormLayerSubmodules(**{**fields, **changes}, post_self_attn_layernorm=norm, post_mlp_layernorm=norm)
    return dataclasses.replace(layer, module=PostNormTransformerLayer, submodules=post)
