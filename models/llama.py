"""Llama 2 / 3 / 3.1 (rope scaling) / 3.2 (tied embeddings): the plainest blocks."""

from __future__ import annotations

from typing import Any

from bridge.mappings import MappingRegistry
from bridge.models.blocks import attention, dense_mlp, embeddings_and_output, pre_mlp_norm
from bridge.models.config import attention_config, check_gated_silu, check_no_bias, decoder_config, gated_mlp_config
from bridge.models.registry import register_bridge
from bridge.models.rope import RotaryBridge, check_rope


@register_bridge("LlamaForCausalLM")
class LlamaBridge(RotaryBridge):
    def check_supported(self) -> None:
        check_gated_silu(self)
        check_no_bias(self, "attention_bias", "mlp_bias")
        check_rope(self)

    def transformer_config_kwargs(self) -> dict[str, Any]:
        c = self.hf_config
        return {**decoder_config(c), **attention_config(c), **gated_mlp_config(c)}

    def mapping_registry(self) -> MappingRegistry:
        return MappingRegistry([*embeddings_and_output(self.tie_word_embeddings), *attention(), *pre_mlp_norm(), *dense_mlp()])
