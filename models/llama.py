"""Llama 2 / 3 / 3.1 (rope scaling) / 3.2 (tied embeddings): the dense decoder the other families extend."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from bridge.mappings import (
    GatedMLPMapping,
    MappingRegistry,
    ParamMapping,
    QKVMapping,
    ReplicatedMapping,
    RowParallelMapping,
    VocabParallelMapping,
)
from bridge.models.registry import register_bridge

from bridge.model_bridge import ModelBridge

LAYER = "decoder.layers.*."
HF_LAYER = "model.layers.*."
# The Llama-3 rope scaling constants Megatron-Core's RotaryEmbedding hard-codes (rope_utils._apply_scaling).
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_parameters(hf_config) -> dict[str, Any]:
    """The rope settings of a transformers-5 config (``rope_parameters``) or an older one (``rope_theta``/``rope_scaling``)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(hf_config, "rope_theta", None) is not None:
        params["rope_theta"] = hf_config.rope_theta
    legacy = getattr(hf_config, "rope_scaling", None)
    if legacy and "rope_type" not in params:
        params.update(legacy)
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", 10000.0)
    return params


def dense_decoder_mappings(tied: bool) -> list[ParamMapping]:
    """The Llama table; the local spec's names and the Transformer Engine spec's fused-norm names."""
    return [
        VocabParallelMapping("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        VocabParallelMapping("output_layer.weight", "model.embed_tokens.weight" if tied else "lm_head.weight", load_only=tied),
        ReplicatedMapping("decoder.final_layernorm.weight", "model.norm.weight"),
        ReplicatedMapping(LAYER + "input_layernorm.weight", HF_LAYER + "input_layernorm.weight"),
        ReplicatedMapping(LAYER + "self_attention.linear_qkv.layer_norm_weight", HF_LAYER + "input_layernorm.weight"),
        QKVMapping(
            LAYER + "self_attention.linear_qkv.weight",
            q=HF_LAYER + "self_attn.q_proj.weight",
            k=HF_LAYER + "self_attn.k_proj.weight",
            v=HF_LAYER + "self_attn.v_proj.weight",
        ),
        RowParallelMapping(LAYER + "self_attention.linear_proj.weight", HF_LAYER + "self_attn.o_proj.weight"),
        ReplicatedMapping(LAYER + "pre_mlp_layernorm.weight", HF_LAYER + "post_attention_layernorm.weight"),
        ReplicatedMapping(LAYER + "mlp.linear_fc1.layer_norm_weight", HF_LAYER + "post_attention_layernorm.weight"),
        GatedMLPMapping(LAYER + "mlp.linear_fc1.weight", gate=HF_LAYER + "mlp.gate_proj.weight", up=HF_LAYER + "mlp.up_proj.weight"),
        RowParallelMapping(LAYER + "mlp.linear_fc2.weight", HF_LAYER + "mlp.down_proj.weight"),
    ]


@register_bridge("LlamaForCausalLM")
class LlamaBridge(ModelBridge):
    hf_ignore = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

    def check_supported(self) -> None:
        c = self.hf_config
        if getattr(c, "hidden_act", "silu") != "silu":
            raise self.unsupported("hidden_act", c.hidden_act, "the bridge maps gated SiLU MLPs only")
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(c, flag, False):
                raise self.unsupported(flag, True, "Megatron-Core adds biases to all linear layers or to QKV only")
        # transformers 5 keeps it in rope_parameters; older configs at the top level
        partial = (getattr(c, "rope_parameters", None) or {}).get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
        if partial not in (None, 1.0):
            raise self.unsupported("partial_rotary_factor", partial, "only full rotary embeddings are mapped")
        self.rope_kwargs()

    @property
    def head_dim(self) -> int:
        c = self.hf_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def transformer_config_kwargs(self) -> dict[str, Any]:
        c = self.hf_config
        return dict(
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            ffn_hidden_size=c.intermediate_size,
            num_attention_heads=c.num_attention_heads,
            num_query_groups=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=c.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            qk_layernorm=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            attention_softmax_in_fp32=True,
            init_method_std=getattr(c, "initializer_range", 0.02),
        )

    def rope_kwargs(self) -> dict[str, Any]:
        rope = rope_parameters(self.hf_config)
        kwargs: dict[str, Any] = {"rotary_base": rope["rope_theta"]}
        kind = rope["rope_type"]
        if kind == "llama3":
            for key, value in MEGATRON_LLAMA3_ROPE.items():
                if float(rope.get(key, value)) != value:
                    raise self.unsupported(f"rope_parameters.{key}", rope[key], f"Megatron-Core's llama3 rope scaling fixes it at {value}")
            kwargs.update(rope_scaling=True, rope_scaling_factor=float(rope["factor"]))
        elif kind == "linear":
            kwargs["seq_len_interpolation_factor"] = float(rope["factor"])
        elif kind != "default":
            raise self.unsupported("rope_parameters.rope_type", kind, "supported: default, linear, llama3")
        return kwargs

    def gpt_model_kwargs(self) -> dict[str, Any]:
        return dict(max_sequence_length=self.hf_config.max_position_embeddings, **self.rope_kwargs())

    def mapping_registry(self) -> MappingRegistry:
        return MappingRegistry(dense_decoder_mappings(self.tie_word_embeddings))
