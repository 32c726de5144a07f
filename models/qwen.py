"""Qwen2 (bias on q/k/v) and Qwen3 (RMSNorm on q and k per head): Llama's blocks with that attention option."""

from __future__ import annotations

from typing import Any

from bridge.mappings import MappingRegistry
from bridge.models.blocks import attention, dense_mlp, embeddings_and_output, pre_mlp_norm
from bridge.models.config import attention_config, check_gated_silu, check_no_bias, decoder_config, gated_mlp_config
from bridge.models.registry import register_bridge
from bridge.models.rope import RotaryBridge, check_rope

from bridge.model_bridge import ModelBridge


def check_qwen(bridge: ModelBridge) -> None:
    """What the Qwen families refuse: sliding windows (``use_sliding_window``), which Qwen applies per layer, and Llama's refusals."""
    if getattr(bridge.hf_config, "use_sliding_window", False):
        raise bridge.unsupported("use_sliding_window", True, "per-layer sliding windows (max_window_layers) are not mapped")
    check_gated_silu(bridge)
    check_no_bias(bridge, "attention_bias", "mlp_bias")
    check_rope(bridge)


@register_bridge("Qwen2ForCausalLM")
class Qwen2Bridge(RotaryBridge):
    def check_supported(self) -> None:
        check_qwen(self)

    def transformer_config_kwargs(self) -> dict[str, Any]:
        c = self.hf_config
        return {**decoder_config(c), **attention_config(c, qkv_bias=True), **gated_mlp_config(c)}

    def mapping_registry(self) -> MappingRegistry:
        return MappingRegistry([*embeddings_and_output(self.tie_word_embeddings), *attention(qkv_bias=True), *pre_mlp_norm(), *dense_mlp()])


@register_bridge("Qwen3ForCausalLM")
class Qwen3Bridge(RotaryBridge):
    def check_supported(self) -> None:
        check_qwen(self)

    def transformer_config_kwargs(self) -> dict[str, Any]:
        c = self.hf_config
        return {**decoder_config(c), **attention_config(c, qk_norm=True), **gated_mlp_config(c)}

    def mapping_registry(self) -> MappingRegistry:
        return MappingRegistry([*embeddings_and_output(self.tie_word_embeddings), *attention(qk_norm=True), *pre_mlp_norm(), *dense_mlp()])
