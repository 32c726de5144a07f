"""Mistral: Llama with sliding-window attention."""

from __future__ import annotations

from typing import Any

from bridge.models.config import sliding_window_config
from bridge.models.llama import LlamaBridge
from bridge.models.registry import register_bridge


@register_bridge("MistralForCausalLM")
class MistralBridge(LlamaBridge):
    def transformer_config_kwargs(self) -> dict[str, Any]:
        return {**super().transformer_config_kwargs(), **sliding_window_config(self.hf_config)}
