"""Phi-3 / Phi-4 / Phi-4-mini (``Phi3ForCausalLM``): Llama's layer with q/k/v and gate/up fused on disk.

``self_attn.qkv_proj`` holds q, k then v rows and ``mlp.gate_up_proj`` gate then up rows; the
mappings read each role's rows out of the one tensor and write it back fused. A partial rotary
embedding (Phi-4-mini's ``partial_rotary_factor``) is Megatron-Core's ``rotary_percent``;
``sliding_window`` applies to every layer, as in Mistral (transformers' Phi3 masks with it).
LongRoPE is refused (``rope.py``). Dropout settings are training-time only and not carried over:
the model is built without dropout, as for every family.
"""

from __future__ import annotations

from typing import Any

from bridge.mappings import MappingRegistry
from bridge.models.blocks import AttentionNames, MLPNames, attention, dense_mlp, embeddings_and_output, pre_mlp_norm
from bridge.models.config import attention_config, check_gated_silu, decoder_config, gated_mlp_config, sliding_window_config
from bridge.models.registry import register_bridge
from bridge.models.rope import RotaryBridge, check_rope


@register_bridge("Phi3ForCausalLM")
class Phi3Bridge(RotaryBridge):
    def check_supported(self) -> None:
        check_gated_silu(self)
        check_rope(self, partial_rotary=True)

    def transformer_config_kwargs(self) -> dict[str, Any]:
        c = self.hf_config
        return {**decoder_config(c), **attention_config(c), **gated_mlp_config(c), **sliding_window_config(c)}

    def mapping_registry(self) -> MappingRegistry:
        return MappingRegistry(
            [
                *embeddings_and_output(self.tie_word_embeddings),
                *attention(AttentionNames(qkv="self_attn.qkv_proj")),
                *pre_mlp_norm(),
                *dense_mlp(MLPNames(gate_up="gate_up_proj")),
            ]
        )
