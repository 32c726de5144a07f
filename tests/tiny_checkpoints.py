"""Tiny HF checkpoints of every supported family, with the switches of their real configs (test fixtures).

Each is ``bridge.demo_model.SMALL_LLAMA``'s dimensions under the family's config class plus the
settings that change its mapping (rope scaling, tied embeddings, q/k norm, q/k/v bias, experts,
shared experts, dense layers among sparse ones, fused q/k/v and gate/up, partial rotary, sliding windows,
post-norms, q/k norms over the whole projection).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from bridge.demo_model import SMALL_LLAMA, save_random_checkpoint

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# name → (config class name, config overrides)
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama3.1": ("LlamaConfig", {"rope_parameters": _LLAMA3_ROPE}),
    "llama3.2": ("LlamaConfig", {"rope_parameters": _LLAMA3_ROPE, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"sliding_window": 4096}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    # Phi-3-mini-4k: fused qkv_proj / gate_up_proj, an odd sliding window (2047 there) shorter than the tests' sequences
    "phi3": ("Phi3Config", {"sliding_window": 7, "pad_token_id": 2}),
    # Phi-4-mini: rope over 3/4 of each head, tied embeddings, no window (its LongRoPE is refused)
    "phi4-mini": (
        "Phi3Config",
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
            "tie_word_embeddings": True,
            "sliding_window": None,
            "pad_token_id": 2,
        },
    ),
    # Gemma: zero-centred norms, scaled embeddings, GeLU-tanh, tied embeddings; head_dim is set in every Gemma config
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    # Gemma 2: post-norms, attention and final logit soft-capping (low caps, so that they bite), alternating
    # windows shorter than the tests' sequences, an attention scale that is not head_dim's
    "gemma2": (
        "Gemma2Config",
        {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 6, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
    ),
    # Gemma 3: per-head q/k norms, a rope base of their own for the sliding layers, linear scaling on the full ones
    "gemma3": (
        "Gemma3TextConfig",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": 5,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        },
    ),
    # Gemma 3 image-text (Gemma-3-4B and up): the text model above under language_model., tied embeddings as there, a
    # small SigLIP vision tower and projector that exports carry unchanged
    "gemma3-vision": (
        "Gemma3Config",
        {
            "text_config": ("gemma3", {"tie_word_embeddings": True}),
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 48,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 28,
                "patch_size": 7,
            },
            "mm_tokens_per_image": 4,
            "boi_token_index": 246,
            "eoi_token_index": 247,
            "image_token_index": 248,
            "tie_word_embeddings": True,
        },
    ),
    # OLMo-2: no pre-norms, norms on the attention and MLP outputs, q/k norms over the whole projection
    "olmo2": ("Olmo2Config", {"pad_token_id": 2}),
}

# Rope settings any rotary family may carry, each tried on one family in the logits matrix: name → (family, overrides).
# YaRN as Qwen2.5's long-context recipe sets it, with DeepSeek's mscale ratio and without rounding the correction range.
ROPE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2-yarn": (
        "qwen2",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "mscale": 1.0,
                "mscale_all_dim": 0.5,
                "truncate": False,
            }
        },
    ),
}

_MOE = dict(num_experts_per_tok=2, output_router_logits=False)
TINY_MOE_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", {**_MOE, "num_local_experts": 4, "intermediate_size": 32, "sliding_window": None}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            **_MOE,
            "num_experts": 4,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "mlp_only_layers": [1],
            "norm_topk_prob": False,
        },
    ),
    "qwen3_moe": ("Qwen3MoeConfig", {**_MOE, "num_experts": 4, "moe_intermediate_size": 32, "norm_topk_prob": True, "head_dim": 32}),
    # OLMoE: q/k norms over the whole projection, top-k of the softmax not renormalised, every layer sparse
    "olmoe": ("OlmoeConfig", {**_MOE, "num_experts": 4, "intermediate_size": 32, "norm_topk_prob": False, "pad_token_id": 2}),
    # GLM-4.5: q/k/v biases, per-head q/k norms (GLM-4.6's switch), rope over half of each head, a dense first layer,
    # DeepSeek-V3's sigmoid router with correction bias in 2 groups (1 chosen) and a scaling factor, one shared expert
    "glm4_moe": (
        "Glm4MoeConfig",
        {
            **_MOE,
            "n_routed_experts": 4,
            "moe_intermediate_size": 32,
            "head_dim": 16,
            "attention_bias": True,
            "use_qk_norm": True,
            "first_k_dense_replace": 1,
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 2.5,
            "n_shared_experts": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        },
    ),
    # DeepSeek-V3: MLA with q_lora, YaRN as the released config (factor 40, mscale = mscale_all_dim = 1), a value head
    # other than hidden / heads, a dense first layer, the sigmoid router in 2 groups (1 chosen), scaling, a shared expert
    "deepseek_v3": (
        "DeepseekV3Config",
        {
            **_MOE,
            "n_routed_experts": 4,
            "moe_intermediate_size": 32,
            "num_key_value_heads": 4,  # MLA has no key/value groups (the released configs: as many as heads)
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 24,
            "first_k_dense_replace": 1,
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 2.5,
            "n_shared_experts": 1,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 163840,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 40.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        },
    ),
    # DeepSeek-V2-Lite: MLA with a plain q_proj, softmax routing (greedy top-k, not renormalised, scaled), two shared experts
    "deepseek_v2_lite": (
        "DeepseekV2Config",
        {
            **_MOE,
            "n_routed_experts": 4,
            "moe_intermediate_size": 32,
            "num_key_value_heads": 4,
            "q_lora_rank": None,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "first_k_dense_replace": 1,
            "topk_method": "greedy",
            "routed_scaling_factor": 1.5,
            "n_shared_experts": 2,
            "rms_norm_eps": 1e-6,
        },
    ),
    # gpt-oss: attention sinks, q/k/v/o biases, alternating windows shorter than the tests' sequences, YaRN as in
    # the real config; experts stacked, input-major, gate/up interleaved, with biases. intermediate = hidden and
    # heads × head_dim = hidden make down_proj and the attention projections square (a transposition cannot
    # pass by shape); a clamp low enough to bite on these activations.
    "gptoss": (
        "GptOssConfig",
        {
            **_MOE,
            "num_local_experts": 4,
            "intermediate_size": 64,
            "head_dim": 16,
            "sliding_window": 5,
            "swiglu_limit": 0.1,
            "max_position_embeddings": 131072,
        },
    ),
}


def tiny_config(name: str, **overrides: Any):
    """The config of the tiny ``name`` model (see ``TINY_MODELS``, ``TINY_MOE_MODELS``) with ``overrides`` (of its
    text model, for an image-text one).

    The tables are deep-copied: transformers edits the ``rope_parameters`` dict it is given.
    """
    import transformers

    class_name, extra = {**TINY_MODELS, **TINY_MOE_MODELS}[name]
    if "text_config" in extra:  # an image-text model whose text model is another tiny model, by name; overrides go to it
        text_name, text_overrides = extra["text_config"]
        text = tiny_config(text_name, **{**text_overrides, **overrides}).to_dict()
        return getattr(transformers, class_name)(**copy.deepcopy({**extra, "text_config": text}))
    return getattr(transformers, class_name)(**copy.deepcopy({**SMALL_LLAMA, **extra, **overrides}))


# gpt-oss-20b's quantization_config: its experts' weights are MXFP4, everything else bf16.
MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
}


def mxfp4_copy(src: str | Path, dst: str | Path) -> Path:
    """``src`` (a gpt-oss checkpoint) with its expert weights in MXFP4 as the released checkpoints store them:
    ``W`` = ``gate_up_proj[e].T`` / ``down_proj[e].T`` as ``_blocks`` and ``_scales``, quantized by the bridge's
    codec (scale = the group maximum over 6 rounded up to a power of two), and ``quantization_config`` set."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from bridge.hf.quantization import quantize_mxfp4

    dst = Path(dst)
    shutil.copytree(src, dst)
    (weights,) = dst.glob("*.safetensors")
    tensors = load_file(weights)
    for name in [n for n in tensors if n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
        blocks, scales = quantize_mxfp4(tensors.pop(name).transpose(1, 2).float())
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks.contiguous(), scales.contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": MXFP4_CONFIG}, indent=2))
    return dst


def build_tiny_checkpoint(
    name: str,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    save_original_format: bool = True,
    **overrides: Any,
) -> Path:
    """Save a randomly initialised tiny ``name`` model with a tokenizer to ``out_dir`` (``save_random_checkpoint``)."""
    return save_random_checkpoint(
        tiny_config(name, **overrides), out_dir, dtype=dtype, seed=seed, save_original_format=save_original_format
    )
