"""Qwen2-MoE (shared expert with a sigmoid gate, dense layers by ``mlp_only_layers``) and Qwen3-MoE (q/k norm)."""

from __future__ import annotations

from typing import Any

from bridge.mappings import GatedMLPMapping, MappingRegistry, ReplicatedMapping, RowParallelMapping
from bridge.mappings.hf_views import FusedExperts
from bridge.models.llama import HF_LAYER, LAYER
from bridge.models.moe import expert_mappings, moe_config_kwargs
from bridge.models.qwen import Qwen2Bridge, Qwen3Bridge
from bridge.models.registry import register_bridge

HF_MLP = HF_LAYER + "mlp."
_FUSED = (
    FusedExperts(HF_MLP + "experts.gate_up_proj", (HF_MLP + "experts.{e}.gate_proj.weight", HF_MLP + "experts.{e}.up_proj.weight")),
    FusedExperts(HF_MLP + "experts.down_proj", (HF_MLP + "experts.{e}.down_proj.weight",)),
)


def moe_layer_pattern(hf_config) -> list[bool]:
    """transformers' rule: a layer is sparse unless listed in ``mlp_only_layers``, every ``decoder_sparse_step``-th."""
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    return [i not in dense and (i + 1) % step == 0 for i in range(hf_config.num_hidden_layers)]


class _QwenMoeMixin:
    hf_views = _FUSED

    def moe_kwargs(self, **extra: Any) -> dict[str, Any]:
        c = self.hf_config
        return moe_config_kwargs(
            c,
            num_experts=c.num_experts,
            expert_ffn=c.moe_intermediate_size,
            normalize_topk=bool(getattr(c, "norm_topk_prob", False)),
            moe_layers=moe_layer_pattern(c),
            **extra,
        )

    def moe_mappings(self) -> list:
        return expert_mappings(
            router=HF_MLP + "gate.weight",
            gate=HF_MLP + "experts.*.gate_proj.weight",
            up=HF_MLP + "experts.*.up_proj.weight",
            down=HF_MLP + "experts.*.down_proj.weight",
        )


@register_bridge("Qwen2MoeForCausalLM")
class Qwen2MoeBridge(_QwenMoeMixin, Qwen2Bridge):
    def transformer_config_kwargs(self) -> dict[str, Any]:
        shared = getattr(self.hf_config, "shared_expert_intermediate_size", 0) or None
        return {**super().transformer_config_kwargs(), **self.moe_kwargs(shared_expert_ffn=shared, shared_expert_gate=bool(shared))}

    def mapping_registry(self) -> MappingRegistry:
        shared = LAYER + "mlp.shared_experts."
        return MappingRegistry(
            super().mapping_registry().mappings
            + self.moe_mappings()
            + [
                GatedMLPMapping(
                    shared + "linear_fc1.weight", gate=HF_MLP + "shared_expert.gate_proj.weight", up=HF_MLP + "shared_expert.up_proj.weight"
                ),
                RowParallelMapping(shared + "linear_fc2.weight", HF_MLP + "shared_expert.down_proj.weight"),
                ReplicatedMapping(shared + "gate_weight", HF_MLP + "shared_expert_gate.weight"),
            ]
        )


@register_bridge("Qwen3MoeForCausalLM")
class Qwen3MoeBridge(_QwenMoeMixin, Qwen3Bridge):
    def transformer_config_kwargs(self) -> dict[str, Any]:
        return {**super().transformer_config_kwargs(), **self.moe_kwargs()}

    def mapping_registry(self) -> MappingRegistry:
        return MappingRegistry(super().mapping_registry().mappings + self.moe_mappings())
