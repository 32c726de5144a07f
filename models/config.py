"""TransformerConfig fragments: the Megatron-Core fields of one part of a decoder, read off an HF config.

A family's ``transformer_config_kwargs`` merges the fragments of its blocks; the ``check_*`` refusals
name the HF settings a fragment cannot express.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from transformers import PretrainedConfig

from bridge.model_bridge import ModelBridge, UnsupportedArchitectureError


def head_dim(hf_config: PretrainedConfig) -> int:
    """``head_dim`` where the config sets it (Qwen3 decouples it from the hidden size), else hidden size / heads."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def decoder_config(hf_config: PretrainedConfig) -> dict[str, Any]:
    """The decoder stack: layers, width, RMSNorm, no linear biases, no dropout (the HF models apply none)."""
    return dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        add_bias_linear=False,
        hidden_dropout=0.0,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
    )


def attention_config(hf_config: PretrainedConfig, *, qkv_bias: bool = False, qk_norm: bool = False) -> dict[str, Any]:
    """Grouped-query self-attention (the options as in ``blocks.attention``), softmax in fp32 as transformers computes it."""
    return dict(
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        kv_channels=head_dim(hf_config),
        add_qkv_bias=qkv_bias,
        qk_layernorm=qk_norm,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
    )


def sliding_window_config(hf_config: PretrainedConfig) -> dict[str, Any]:
    """``sliding_window`` on every layer, when set.

    HF attends to the last ``window`` keys including the current one; Megatron's (left, right) window
    counts the keys to the left of the query.
    """
    window = getattr(hf_config, "sliding_window", None)
    return {"window_size": (window - 1, 0)} if window else {}


def layer_types(hf_config: PretrainedConfig) -> list[str]:
    """Each layer's attention kind (``layer_types``); all full where the config lists none."""
    return list(getattr(hf_config, "layer_types", None) or ["full_attention"] * hf_config.num_hidden_layers)


def alternating_window_config(hf_config: PretrainedConfig) -> dict[str, Any]:
    """``sliding_window`` on the layers ``layer_types`` marks ``sliding_attention`` (Gemma 2/3, gpt-oss), when any.

    Megatron-Core's ``window_attn_skip_freq`` as a list says per layer whether it slides; its window
    counts the keys left of the query, HF's the last ``window`` keys including the query's own.
    """
    sliding = [int(kind == "sliding_attention") for kind in layer_types(hf_config)]
    window = getattr(hf_config, "sliding_window", None)
    return {"window_size": (window - 1, 0), "window_attn_skip_freq": sliding} if window and any(sliding) else {}


def gated_mlp_config(hf_config: PretrainedConfig) -> dict[str, Any]:
    """SwiGLU MLPs (dense ones and experts alike); ``intermediate_size`` is the dense MLP's."""
    return dict(ffn_hidden_size=hf_config.intermediate_size, gated_linear_unit=True, activation_func=F.silu)


def moe_config(
    hf_config: PretrainedConfig,
    *,
    num_experts: int,
    expert_ffn: int,
    normalize_topk: bool,
    moe_layers: list[bool],
    shared_expert_ffn: int | None = None,
    shared_expert_gate: bool = False,
    input_jitter: float = 0.0,
) -> dict[str, Any]:
    """Megatron-Core MoE fields for a softmax top-k router as transformers implements it.

    transformers: softmax over all experts, top-k, then (when ``normalize_topk``) renormalise the k
    weights. Megatron-Core: ``pre_softmax`` takes the top-k of the softmax (no renormalisation);
    without it, the softmax of the top-k logits, which equals the renormalised weights.
    """
    if not any(moe_layers):
        raise UnsupportedArchitectureError("the config describes an MoE model with no MoE layer")
    aux = bool(getattr(hf_config, "output_router_logits", False))
    return dict(
        num_moe_experts=num_experts,
        moe_ffn_hidden_size=expert_ffn,
        moe_router_topk=hf_config.num_experts_per_tok,
        moe_router_pre_softmax=not normalize_topk,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",  # transformers computes the router softmax in fp32
        moe_router_load_balancing_type="aux_loss" if aux else "none",
        moe_aux_loss_coeff=float(getattr(hf_config, "router_aux_loss_coef", 0.0)) if aux else 0.0,
        moe_expert_capacity_factor=None,  # no token dropping, as in transformers
        moe_grouped_gemm=False,
        moe_layer_freq=[int(is_moe) for is_moe in moe_layers],
        moe_shared_expert_intermediate_size=shared_expert_ffn,
        moe_shared_expert_gate=shared_expert_gate,
        moe_input_jitter_eps=input_jitter or None,
    )


def dense_first_layers(hf_config: PretrainedConfig) -> list[bool]:
    """Which layers are MoE in DeepSeek's and GLM's checkpoints: all but the first ``first_k_dense_replace``."""
    dense = getattr(hf_config, "first_k_dense_replace", 0) or 0
    return [i >= dense for i in range(hf_config.num_hidden_layers)]


def shared_expert_ffn(hf_config: PretrainedConfig) -> int | None:
    """DeepSeek's and GLM's shared experts as one MLP: ``n_shared_experts`` of ``moe_intermediate_size`` each."""
    return (hf_config.moe_intermediate_size * hf_config.n_shared_experts) or None


# The sigmoid router's correction bias on disk: Megatron-Core's expert_bias buffer, float32 whatever the parameters' dtype.
CORRECTION_BIAS = r"model\.layers\.\d+\.mlp\.gate\.e_score_correction_bias"


def sigmoid_router_config(bridge: ModelBridge) -> dict[str, Any]:
    """DeepSeek-V3's router (GLM-4.5's too), over ``moe_config``'s softmax fields.

    transformers: sigmoid scores; the experts are chosen by the scores plus ``e_score_correction_bias``
    (Megatron-Core's ``expert_bias`` buffer, updated by a rule, not by gradients), within the
    ``topk_group`` of ``n_group`` groups whose two best scores sum highest; the chosen experts' plain
    scores, renormalised when ``norm_topk_prob``, times ``routed_scaling_factor``, weigh them.
    Megatron-Core renormalises always (k > 1) and ranks groups by their best ``topk / topk_group``
    scores: the settings where the two differ are refused.
    """
    c = bridge.hf_config
    topk, groups, topk_group = c.num_experts_per_tok, getattr(c, "n_group", 1) or 1, getattr(c, "topk_group", 1) or 1
    if topk > 1 and not getattr(c, "norm_topk_prob", True):
        raise bridge.unsupported("norm_topk_prob", False, "Megatron-Core's sigmoid router always renormalises the top-k weights")
    if groups > 1 and topk // topk_group != 2:
        best = topk // topk_group
        why = f"Megatron-Core ranks the groups by their best num_experts_per_tok / topk_group = {best} scores, transformers by 2"
        raise bridge.unsupported("topk_group", topk_group, why)
    scaling = float(getattr(c, "routed_scaling_factor", 1.0) or 1.0)
    return dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=groups if groups > 1 else None,
        moe_router_group_topk=topk_group if groups > 1 else None,
        moe_router_topk_scaling_factor=scaling if scaling != 1.0 else None,
    )


def check_gated_silu(bridge: ModelBridge) -> None:
    """``gated_mlp_config`` maps SiLU-gated MLPs only."""
    act = getattr(bridge.hf_config, "hidden_act", "silu")
    if act != "silu":
        raise bridge.unsupported("hidden_act", act, "the bridge maps gated SiLU MLPs only")


def check_no_bias(bridge: ModelBridge, *flags: str) -> None:
    """Refuse HF bias switches: Megatron-Core puts biases on all linear layers or on QKV only."""
    for flag in flags:
        if getattr(bridge.hf_config, flag, False):
            raise bridge.unsupported(flag, True, "Megatron-Core adds biases to all linear layers or to QKV only")
