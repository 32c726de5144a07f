"""Mistral: the Llama layout, plus sliding-window attention."""

from __future__ import annotations

from typing import Any

from bridge.models.llama import LlamaBridge
from bridge.models.registry import register_bridge


@register_bridge("MistralForCausalLM")
class MistralBridge(LlamaBridge):
    def transformer_config_kwargs(self) -> dict[str, Any]:
        kwargs = super().transformer_config_kwargs()
        window = getattr(self.hf_config, "sliding_window", None)
        if window:
            # HF attends to the last `window` keys including the current one; Megatron's (left, right)
            # window counts the keys to the left of the query.
            kwargs["window_size"] = (window - 1, 0)
        return kwargs
