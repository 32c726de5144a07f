"""Qwen2 (bias on q/k/v) and Qwen3 (RMSNorm on q and k per head): the Llama layout plus those tensors."""

from __future__ import annotations

from typing import Any

from bridge.mappings import MappingRegistry, QKVMapping, ReplicatedMapping
from bridge.models.llama import HF_LAYER, LAYER, LlamaBridge, dense_decoder_mappings
from bridge.models.registry import register_bridge


class _QwenBridge(LlamaBridge):
    def check_supported(self) -> None:
        if getattr(self.hf_config, "use_sliding_window", False):
            raise self.unsupported("use_sliding_window", True, "per-layer sliding windows (max_window_layers) are not mapped")
        super().check_supported()


@register_bridge("Qwen2ForCausalLM")
class Qwen2Bridge(_QwenBridge):
    def transformer_config_kwargs(self) -> dict[str, Any]:
        return {**super().transformer_config_kwargs(), "add_qkv_bias": True}

    def mapping_registry(self) -> MappingRegistry:
        return MappingRegistry(
            dense_decoder_mappings(self.tie_word_embeddings)
            + [
                QKVMapping(
                    LAYER + "self_attention.linear_qkv.bias",
                    q=HF_LAYER + "self_attn.q_proj.bias",
                    k=HF_LAYER + "self_attn.k_proj.bias",
                    v=HF_LAYER + "self_attn.v_proj.bias",
                )
            ]
        )


@register_bridge("Qwen3ForCausalLM")
class Qwen3Bridge(_QwenBridge):
    def transformer_config_kwargs(self) -> dict[str, Any]:
        return {**super().transformer_config_kwargs(), "qk_layernorm": True}

    def mapping_registry(self) -> MappingRegistry:
        return MappingRegistry(
            dense_decoder_mappings(self.tie_word_embeddings)
            + [
                ReplicatedMapping(LAYER + "self_attention.q_layernorm.weight", HF_LAYER + "self_attn.q_norm.weight"),
                ReplicatedMapping(LAYER + "self_attention.k_layernorm.weight", HF_LAYER + "self_attn.k_norm.weight"),
            ]
        )
