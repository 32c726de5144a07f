"""Qwen2-MoE (q/k/v bias, a shared expert with a sigmoid gate) and Qwen3-MoE (q/k norm).

Layers are sparse except those ``mlp_only_layers`` (or ``decoder_sparse_step``) leaves dense.
"""

from __future__ import annotations

from typing import Any

from bridge.mappings import MappingRegistry
from bridge.models.blocks import (
    attention,
    dense_mlp,
    embeddings_and_output,
    fused_expert_views,
    pre_mlp_norm,
    routed_experts,
    shared_experts,
)
from bridge.models.config import attention_config, decoder_config, gated_mlp_config, moe_config
from bridge.models.qwen import check_qwen
from bridge.models.registry import register_bridge
from bridge.models.rope import RotaryBridge
from transformers import PretrainedConfig


def moe_layer_pattern(hf_config: PretrainedConfig) -> list[bool]:
    """transformers' rule: a layer is sparse unless listed in ``mlp_only_layers``, every ``decoder_sparse_step``-th."""
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    return [i not in dense and (i + 1) % step == 0 for i in range(hf_config.num_hidden_layers)]


def qwen_moe_config(hf_config: PretrainedConfig, **shared: Any) -> dict[str, Any]:
    """The MoE fields both Qwen MoE families read the same way; ``shared``: their shared-expert fields."""
    c = hf_config
    return moe_config(
        c,
        num_experts=c.num_experts,
        expert_ffn=c.moe_intermediate_size,
        normalize_topk=bool(getattr(c, "norm_topk_prob", False)),
        moe_layers=moe_layer_pattern(c),
        **shared,
    )


@register_bridge("Qwen2MoeForCausalLM")
class Qwen2MoeBridge(RotaryBridge):
    hf_views = fused_expert_views()

    def check_supported(self) -> None:
        check_qwen(self)

    def transformer_config_kwargs(self) -> dict[str, Any]:
        c = self.hf_config
        shared = getattr(c, "shared_expert_intermediate_size", 0) or None
        moe = qwen_moe_config(c, shared_expert_ffn=shared, shared_expert_gate=bool(shared))
        return {**decoder_config(c), **attention_config(c, qkv_bias=True), **gated_mlp_config(c), **moe}

    def mapping_registry(self) -> MappingRegistry:
        return MappingRegistry(
            [
                *embeddings_and_output(self.tie_word_embeddings),
                *attention(qkv_bias=True),
                *pre_mlp_norm(),
                *dense_mlp(),
                *routed_experts(),
                *shared_experts(gate="mlp.shared_expert_gate"),
            ]
        )


@register_bridge("Qwen3MoeForCausalLM")
class Qwen3MoeBridge(RotaryBridge):
    hf_views = fused_expert_views()

    def check_supported(self) -> None:
        check_qwen(self)

    def transformer_config_kwargs(self) -> dict[str, Any]:
        c = self.hf_config
        return {**decoder_config(c), **attention_config(c, qk_norm=True), **gated_mlp_config(c), **qwen_moe_config(c)}

    def mapping_registry(self) -> MappingRegistry:
        return MappingRegistry(
            [
                *embeddings_and_output(self.tie_word_embeddings),
                *attention(qk_norm=True),
                *pre_mlp_norm(),
                *dense_mlp(),
                *routed_experts(),
            ]
        )
