"""What the MoE families share: HF router settings → Megatron-Core MoE config, and the expert mapping rows."""

from __future__ import annotations

from typing import Any

from bridge.mappings import GatedMLPMapping, ParamMapping, ReplicatedMapping, RowParallelMapping

from bridge.model_bridge import UnsupportedArchitectureError

LAYER = "decoder.layers.*."
EXPERT = LAYER + "mlp.experts.local_experts.*."


def moe_config_kwargs(
    hf_config,
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


def expert_mappings(router: str, gate: str, up: str, down: str) -> list[ParamMapping]:
    """Router and routed experts; HF patterns have ``*`` for the layer, then ``*`` for the expert."""
    return [
        ReplicatedMapping(LAYER + "mlp.router.weight", router),
        GatedMLPMapping(EXPERT + "linear_fc1.weight", gate=gate, up=up),
        RowParallelMapping(EXPERT + "linear_fc2.weight", down),
    ]
