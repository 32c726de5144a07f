"""gpt-oss (``GptOssForCausalLM``: gpt-oss-20b, gpt-oss-120b).

Attention with q/k/v/o biases and a learned sink logit per head (``self_attn.sinks``: Megatron-Core's
learnable softmax offset), sliding windows on the layers ``layer_types`` marks, YaRN rope. Every layer
is sparse: a router with a bias (top-k of the logits, softmax over the k), experts with biases whose
clamped SwiGLU is ``(clamp(up, ±limit) + 1) · g · sigmoid(alpha · g)``, ``g = clamp(gate, max=limit)``
(Megatron-Core's gated MLP with ``activation_func_clamp_value`` and ``glu_linear_offset``). The experts
are stored stacked and input-major, gate and up interleaved (``bridge/mappings/transposed.py``); the
released checkpoints hold them in MXFP4 (``bridge/hf/mxfp4_experts.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from bridge.mappings import (
    ColumnParallelMapping,
    InterleavedGateUpMapping,
    MappingRegistry,
    ReplicatedMapping,
    RowParallelMapping,
    TransposedRowParallelMapping,
)
from bridge.mappings.hf_views import stacked_experts, stacked_slice_name
from bridge.models.blocks import HF_LAYER, LAYER, attention, embeddings_and_output, pre_mlp_norm
from bridge.models.config import alternating_window_config, attention_config, decoder_config, layer_types, moe_config
from bridge.models.registry import register_bridge
from bridge.models.rope import RotaryBridge, check_rope

from bridge.hf.mxfp4_experts import Mxfp4Experts

EXPERTS = HF_LAYER + "mlp.experts."
STACKED = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
QUANTIZED = ("gate_up_proj", "down_proj")  # MXFP4 in the released checkpoints


def alpha_sigmoid_gate(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``x · sigmoid(alpha · x)``: the gate of gpt-oss's SwiGLU (Megatron-Core's ``quick_gelu`` at alpha 1.702)."""
    return x * torch.sigmoid(alpha * x)


def expert(name: str) -> str:
    """The HF slice of expert ``*`` of the stacked expert tensor ``name`` in a layer."""
    return stacked_slice_name(EXPERTS + name, "*")


@register_bridge("GptOssForCausalLM")
class GptOssBridge(RotaryBridge):
    mxfp4_modules_to_not_convert = ("model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head")
    hf_views = (*(stacked_experts(EXPERTS + name) for name in STACKED), *(Mxfp4Experts(EXPERTS + name) for name in QUANTIZED))

    def check_supported(self) -> None:
        c = self.hf_config
        if not getattr(c, "attention_bias", True):
            raise self.unsupported("attention_bias", False, "the bridge maps gpt-oss with its attention biases")
        unknown = sorted(set(layer_types(c)) - {"sliding_attention", "full_attention"})
        if unknown:
            raise self.unsupported("layer_types", unknown[0], "known kinds: sliding_attention, full_attention")
        check_rope(self)

    def transformer_config_kwargs(self) -> dict[str, Any]:
        c = self.hf_config
        moe = moe_config(
            c,
            num_experts=c.num_local_experts,
            expert_ffn=c.intermediate_size,
            normalize_topk=True,  # softmax over the top-k logits
            moe_layers=[True] * c.num_hidden_layers,
        )
        return {
            **decoder_config(c),
            **attention_config(c, qkv_bias=True),
            **alternating_window_config(c),
            **moe,
            "add_bias_linear": True,
            "softmax_type": "learnable",
            "ffn_hidden_size": c.intermediate_size,
            "gated_linear_unit": True,
            "activation_func": functools.partial(alpha_sigmoid_gate, alpha=float(c.swiglu_alpha)),
            "activation_func_clamp_value": float(c.swiglu_limit),
            "glu_linear_offset": 1.0,
        }

    def mapping_registry(self) -> MappingRegistry:
        fc1, fc2 = LAYER + "mlp.experts.local_experts.*.linear_fc1.", LAYER + "mlp.experts.local_experts.*.linear_fc2."
        return MappingRegistry(
            [
                *embeddings_and_output(self.tie_word_embeddings),
                *attention(qkv_bias=True),
                RowParallelMapping(LAYER + "self_attention.linear_proj.bias", HF_LAYER + "self_attn.o_proj.bias"),
                ColumnParallelMapping(LAYER + "self_attention.core_attention.softmax_offset", HF_LAYER + "self_attn.sinks"),
                *pre_mlp_norm(),
                ReplicatedMapping(LAYER + "mlp.router.weight", HF_LAYER + "mlp.router.weight"),
                ReplicatedMapping(LAYER + "mlp.router.bias", HF_LAYER + "mlp.router.bias"),
                InterleavedGateUpMapping(fc1 + "weight", expert("gate_up_proj")),
                InterleavedGateUpMapping(fc1 + "bias", expert("gate_up_proj_bias")),
                TransposedRowParallelMapping(fc2 + "weight", expert("down_proj")),
                RowParallelMapping(fc2 + "bias", expert("down_proj_bias")),
            ]
        )
