"""OLMo-2 (``Olmo2ForCausalLM``) and OLMoE (``OlmoeForCausalLM``): q/k norms over the whole projection.

Both normalise ``q_proj(x)`` and ``k_proj(x)`` as one vector across all heads (``DecoderShape.qk_norm``
``"projection"``; under TP one all-reduce of the sums of squares). OLMo-2's layer has no pre-norms:
``post_attention_layernorm`` and ``post_feedforward_layernorm`` normalise the attention and MLP outputs
before the residual adds. OLMoE is pre-norm, every layer sparse: softmax routing over all experts, top-k,
renormalised only with ``norm_topk_prob``; its checkpoints name experts as Qwen2-MoE does.
"""

from __future__ import annotations

from typing import Any

from bridge.mappings import MappingRegistry
from bridge.models.blocks import (
    AttentionNames,
    attention,
    dense_mlp,
    embeddings_and_output,
    fused_expert_views,
    post_norms,
    pre_mlp_norm,
    routed_experts,
)
from bridge.models.config import attention_config, check_gated_silu, check_no_bias, decoder_config, gated_mlp_config, moe_config
from bridge.models.registry import register_bridge
from bridge.models.rope import RotaryBridge, check_rope

from bridge.megatron.layers.decoder_shape import DecoderShape
from bridge.model_bridge import ModelBridge


def check_olmo(bridge: ModelBridge) -> None:
    """Llama's refusals, and OLMoE's clamp of q/k/v (``clip_qkv``), which Megatron-Core's attention has no place for."""
    clip = getattr(bridge.hf_config, "clip_qkv", None)
    if clip is not None:
        raise bridge.unsupported("clip_qkv", clip, "clamping q/k/v after their projections is not mapped")
    check_gated_silu(bridge)
    check_no_bias(bridge, "attention_bias", "mlp_bias")
    check_rope(bridge)


@register_bridge("Olmo2ForCausalLM")
class Olmo2Bridge(RotaryBridge):
    decoder_shape = DecoderShape(pre_norms=False, post_norms=True, qk_norm="projection")

    def check_supported(self) -> None:
        check_olmo(self)

    def transformer_config_kwargs(self) -> dict[str, Any]:
        c = self.hf_config
        return {**decoder_config(c), **attention_config(c, qk_norm=True), **gated_mlp_config(c)}

    def mapping_registry(self) -> MappingRegistry:
        return MappingRegistry(
            [
                *embeddings_and_output(self.tie_word_embeddings),
                *attention(AttentionNames(input_norm=None), qk_norm=True),
                *post_norms(),
                *dense_mlp(pre_norm=None),
            ]
        )


@register_bridge("OlmoeForCausalLM")
class OlmoeBridge(RotaryBridge):
    decoder_shape = DecoderShape(qk_norm="projection")
    hf_views = fused_expert_views()

    def check_supported(self) -> None:
        check_olmo(self)

    def transformer_config_kwargs(self) -> dict[str, Any]:
        c = self.hf_config
        moe = moe_config(
            c,
            num_experts=c.num_experts,
            expert_ffn=c.intermediate_size,
            normalize_topk=bool(getattr(c, "norm_topk_prob", False)),
            moe_layers=[True] * c.num_hidden_layers,
        )
        return {**decoder_config(c), **attention_config(c, qk_norm=True), **gated_mlp_config(c), **moe}

    def mapping_registry(self) -> MappingRegistry:
        return MappingRegistry(
            [
                *embeddings_and_output(self.tie_word_embeddings),
                *attention(qk_norm=True),
                *pre_mlp_norm(),
                *routed_experts(),
            ]
        )
