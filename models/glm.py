"""GLM-4.5 (``Glm4MoeForCausalLM``: GLM-4.5, GLM-4.5-Air, GLM-4.6/4.7).

Llama's attention with q/k/v biases (``attention_bias``), optional per-head q/k norms (``use_qk_norm``)
and rope over the leading ``partial_rotary_factor`` of each head; the first ``first_k_dense_replace``
layers dense (``intermediate_size``), the rest MoE (``moe_intermediate_size``) with DeepSeek-V3's
sigmoid router (``models.config.sigmoid_router_config``: correction bias, groups, scaling) and
``n_shared_experts`` shared experts without a gate.
"""

from __future__ import annotations

from typing import Any

from bridge.mappings import MappingRegistry, ReplicatedMapping
from bridge.models.blocks import (
    HF_LAYER,
    LAYER,
    MLPNames,
    attention,
    dense_mlp,
    embeddings_and_output,
    fused_expert_views,
    pre_mlp_norm,
    routed_experts,
    shared_experts,
)
from bridge.models.config import (
    CORRECTION_BIAS,
    attention_config,
    check_gated_silu,
    decoder_config,
    dense_first_layers,
    gated_mlp_config,
    moe_config,
    shared_expert_ffn,
    sigmoid_router_config,
)
from bridge.models.mtp import MultiTokenPrediction
from bridge.models.registry import register_bridge
from bridge.models.rope import RotaryBridge, check_rope

SHARED = MLPNames(prefix="mlp.shared_experts.")


@register_bridge("Glm4MoeForCausalLM")
class Glm4MoeBridge(MultiTokenPrediction, RotaryBridge):
    hf_views = fused_expert_views()
    hf_fp32_weights = (CORRECTION_BIAS,)

    def check_supported(self) -> None:
        check_gated_silu(self)
        check_rope(self, partial_rotary=True)
        sigmoid_router_config(self)

    def transformer_config_kwargs(self) -> dict[str, Any]:
        c = self.hf_config
        moe = moe_config(
            c,
            num_experts=c.n_routed_experts,
            expert_ffn=c.moe_intermediate_size,
            normalize_topk=True,
            moe_layers=dense_first_layers(c),
            shared_expert_ffn=shared_expert_ffn(c),
        )
        attn = attention_config(c, qkv_bias=bool(c.attention_bias), qk_norm=bool(getattr(c, "use_qk_norm", False)))
        return {**decoder_config(c), **attn, **gated_mlp_config(c), **moe, **sigmoid_router_config(self)}

    def mapping_registry(self) -> MappingRegistry:
        c = self.hf_config
        return self.with_mtp_block(
            [
                *embeddings_and_output(self.tie_word_embeddings),
                *attention(qkv_bias=bool(c.attention_bias), qk_norm=bool(getattr(c, "use_qk_norm", False))),
                *pre_mlp_norm(),
                *dense_mlp(),
                *routed_experts(),
                ReplicatedMapping(LAYER + "mlp.router.expert_bias", HF_LAYER + "mlp.gate.e_score_correction_bias"),
                *shared_experts(SHARED),
            ]
        )
