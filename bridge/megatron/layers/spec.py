"""Editing Megatron-Core's local GPT layer specs to the ``DecoderShape`` a model bridge declares."""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from bridge.megatron.layers.attention_variants import SlidingRopeSelfAttention, SoftCappedDotProductAttention
from bridge.megatron.layers.decoder_shape import DecoderShape
from bridge.megatron.layers.post_norm_layer import PostNormLayerSubmodules, PostNormTransformerLayer
from bridge.megatron.layers.projection_norm import ProjectionRMSNorm


def apply_decoder_shape(block: TransformerBlockSubmodules, shape: DecoderShape) -> TransformerBlockSubmodules:
    """A copy of a local-spec decoder ``block`` whose layers have ``shape``; norms added are of the block's final norm's kind."""
    if shape.is_megatron_default:
        return block
    layers = [_layer_spec(layer, shape, block.layer_norm) for layer in block.layer_specs]
    return dataclasses.replace(block, layer_specs=layers)


def _attention_spec(attention: ModuleSpec, shape: DecoderShape) -> ModuleSpec:
    inner = attention.submodules
    if shape.qk_norm == "projection" and inner.q_layernorm not in (None, IdentityOp):
        inner = dataclasses.replace(
            inner,
            q_layernorm=ModuleSpec(module=ProjectionRMSNorm, params={"role": "query"}),
            k_layernorm=ModuleSpec(module=ProjectionRMSNorm, params={"role": "key"}),
        )
    if shape.attn_logit_softcap:
        inner = dataclasses.replace(
            inner, core_attention=ModuleSpec(module=SoftCappedDotProductAttention, params={"softcap": shape.attn_logit_softcap})
        )
    attention = dataclasses.replace(attention, submodules=inner)
    if shape.sliding_rope_base:
        params = {**attention.params, "sliding_rope_base": shape.sliding_rope_base}
        attention = dataclasses.replace(attention, module=SlidingRopeSelfAttention, params=params)
    return attention


def _layer_spec(layer: ModuleSpec, shape: DecoderShape, norm: ModuleSpec | type) -> ModuleSpec:
    sub = layer.submodules
    changes = {"self_attention": _attention_spec(sub.self_attention, shape)}
    if not shape.pre_norms:
        changes.update(input_layernorm=IdentityOp, pre_mlp_layernorm=IdentityOp)
    if not shape.post_norms:
        return dataclasses.replace(layer, submodules=dataclasses.replace(sub, **changes))
    fields = {f.name: getattr(sub, f.name) for f in dataclasses.fields(sub)}
    post = PostNormLayerSubmodules(**{**fields, **changes}, post_self_attn_layernorm=norm, post_mlp_layernorm=norm)
    return dataclasses.replace(layer, module=PostNormTransformerLayer, submodules=post)
