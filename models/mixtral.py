"""Mixtral: Mistral's attention with a sparse MoE block (``block_sparse_moe``: router ``gate``, experts ``w1/w3/w2``) in every layer."""

from __future__ import annotations

from typing import Any

from bridge.mappings import MappingRegistry
from bridge.models.blocks import ExpertNames, MLPNames, attention, embeddings_and_output, fused_expert_views, pre_mlp_norm, routed_experts
from bridge.models.config import (
    attention_config,
    check_gated_silu,
    check_no_bias,
    decoder_config,
    gated_mlp_config,
    moe_config,
    sliding_window_config,
)
from bridge.models.registry import register_bridge
from bridge.models.rope import RotaryBridge, check_rope

EXPERTS = ExpertNames(router="block_sparse_moe.gate", experts=MLPNames("block_sparse_moe.experts.*.", gate="w1", up="w3", down="w2"))


@register_bridge("MixtralForCausalLM")
class MixtralBridge(RotaryBridge):
    hf_views = fused_expert_views(EXPERTS)

    def check_supported(self) -> None:
        check_gated_silu(self)
        check_no_bias(self, "attention_bias", "mlp_bias")
        check_rope(self)

    def transformer_config_kwargs(self) -> dict[str, Any]:
        c = self.hf_config
        moe = moe_config(
            c,
            num_experts=c.num_local_experts,
            expert_ffn=c.intermediate_size,
            normalize_topk=True,
            moe_layers=[True] * c.num_hidden_layers,
            input_jitter=getattr(c, "router_jitter_noise", 0.0),
        )
        return {**decoder_config(c), **attention_config(c), **sliding_window_config(c), **gated_mlp_config(c), **moe}

    def mapping_registry(self) -> MappingRegistry:
        return MappingRegistry([*embeddings_and_output(self.tie_word_embeddings), *attention(), *pre_mlp_norm(), *routed_experts(EXPERTS)])
