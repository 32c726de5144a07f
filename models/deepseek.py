"""DeepSeek-V2 (V2, V2-Lite) and DeepSeek-V3 (V3, R1, Kimi-K2, Moonlight: ``DeepseekV3ForCausalLM``).

Multi-latent attention ⇄ Megatron-Core's ``MLASelfAttention`` (local modules, ``bridge/megatron/layers/mla.py``):
q through a low-rank ``q_a_proj``/``q_a_layernorm``/``q_b_proj`` (or a plain ``q_proj`` when
``q_lora_rank`` is null), k and v from the latent ``kv_a_proj_with_mqa`` (its last ``qk_rope_head_dim``
rows the shared rope key), ``kv_a_layernorm`` and ``kv_b_proj`` (per head: nope rows, then v rows). The
rope dims are rotated in pairs (V2's complex rotation, V3's ``rope_interleave``), which is what
Megatron-Core's MLA does: the rows are copied as they are (checked by logits). YaRN with ``mscale`` /
``mscale_all_dim`` is MLA's own (softmax scale included). The first ``first_k_dense_replace`` layers
are dense, the others MoE with ``n_shared_experts`` shared experts; V3 routes with the sigmoid router
and its correction bias (``models.config.sigmoid_router_config``), V2 with softmax scores.
The ``q_a_layernorm``/``kv_a_layernorm`` use ``rms_norm_eps`` (transformers fixes 1e-6: the released
configs' value).
"""

from __future__ import annotations

from typing import Any

from bridge.mappings import ColumnParallelMapping, MappingRegistry, ParamMapping, ReplicatedMapping, RowParallelMapping
from bridge.models.blocks import (
    HF_LAYER,
    LAYER,
    MLPNames,
    dense_mlp,
    embeddings_and_output,
    fused_expert_views,
    norm,
    pre_mlp_norm,
    routed_experts,
    shared_experts,
)
from bridge.models.config import (
    CORRECTION_BIAS,
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
from bridge.models.rope import ROTARY_BUFFERS, rope_parameters, yarn_parameters

from bridge.model_bridge import ModelBridge

SHARED = MLPNames(prefix="mlp.shared_experts.")


def mla_attention(q_lora: bool) -> list[ParamMapping]:
    """MLA and its input norm. The down projections are column-parallel in the local spec (their rows split
    over TP, gathered before use); the up projections split by heads; the norms whole on every rank."""
    mla, hf = LAYER + "self_attention.", HF_LAYER + "self_attn."
    if q_lora:
        query = [
            ColumnParallelMapping(mla + "linear_q_down_proj.weight", hf + "q_a_proj.weight"),
            *norm("self_attn.q_a_layernorm", "self_attention.q_layernorm.weight"),
            ColumnParallelMapping(mla + "linear_q_up_proj.weight", hf + "q_b_proj.weight"),
        ]
    else:
        query = [ColumnParallelMapping(mla + "linear_q_proj.weight", hf + "q_proj.weight")]
    return [
        *norm("input_layernorm", "input_layernorm.weight"),
        *query,
        ColumnParallelMapping(mla + "linear_kv_down_proj.weight", hf + "kv_a_proj_with_mqa.weight"),
        *norm("self_attn.kv_a_layernorm", "self_attention.kv_layernorm.weight"),
        ColumnParallelMapping(mla + "linear_kv_up_proj.weight", hf + "kv_b_proj.weight"),
        RowParallelMapping(mla + "linear_proj.weight", hf + "o_proj.weight"),
    ]


class _DeepseekBridge(MultiTokenPrediction, ModelBridge):
    """What V2 and V3 share: MLA, dense first layers, shared experts; the router is each one's."""

    hf_ignore = ROTARY_BUFFERS
    hf_fp32_weights = (CORRECTION_BIAS,)
    hf_views = fused_expert_views()
    # The local spec decides the down projections' TP layout (Transformer Engine's keeps them whole on every rank).
    transformer_engine_layers = False

    def check_supported(self) -> None:
        c = self.hf_config
        check_gated_silu(self)
        if getattr(c, "attention_bias", False):
            raise self.unsupported("attention_bias", True, "MLA is mapped without biases")
        if getattr(c, "rope_interleave", True) is False:
            raise self.unsupported("rope_interleave", False, "the rope rows are mapped as rotated in pairs (the released configs)")
        self.mla_rope()

    def mla_rope(self) -> dict[str, Any]:
        """MLA's own rope fields: YaRN as in the released configs, or a plain rope."""
        rope = rope_parameters(self.hf_config)
        kind = rope["rope_type"]
        if kind == "default":
            return dict(rope_type="rope", rotary_base=rope["rope_theta"], rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
        if kind != "yarn":
            raise self.unsupported("rope_parameters.rope_type", kind, "MLA is mapped with YaRN or without scaling")
        yarn = yarn_parameters(self, rope)
        if not yarn.truncate:
            raise self.unsupported("rope_parameters.truncate", False, "MLA's YaRN always rounds its correction range")
        return dict(
            rope_type="yarn",
            rotary_base=rope["rope_theta"],
            rotary_scaling_factor=yarn.factor,
            original_max_position_embeddings=yarn.original_max_position_embeddings,
            beta_fast=yarn.beta_fast,
            beta_slow=yarn.beta_slow,
            # MLA scales cos/sin by the ratio when given mscale; its softmax scale uses mscale_all_dim alone, as HF's
            mscale=yarn.mscale if yarn.ratio_set else None,
            mscale_all_dim=yarn.mscale_all_dim or 0.0,
        )

    def router_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def transformer_config_kwargs(self) -> dict[str, Any]:
        c = self.hf_config
        mla = dict(
            multi_latent_attention=True,
            num_attention_heads=c.num_attention_heads,
            q_lora_rank=c.q_lora_rank,
            kv_lora_rank=c.kv_lora_rank,
            qk_head_dim=c.qk_nope_head_dim,
            qk_pos_emb_head_dim=c.qk_rope_head_dim,
            v_head_dim=c.v_head_dim,
            qk_layernorm=True,  # the local spec's q/kv latent norms are identities without it
            rotary_interleaved=False,
            attention_dropout=0.0,
            attention_softmax_in_fp32=True,
            **self.mla_rope(),
        )
        moe = moe_config(
            c,
            num_experts=c.n_routed_experts,
            expert_ffn=c.moe_intermediate_size,
            normalize_topk=True,
            moe_layers=dense_first_layers(c),
            shared_expert_ffn=shared_expert_ffn(c),
        )
        return {**decoder_config(c), **gated_mlp_config(c), **mla, **moe, **self.router_config()}

    def gpt_model_kwargs(self) -> dict[str, Any]:
        """MLA builds its own rotary embedding: the model has none."""
        return {"max_sequence_length": self.hf_config.max_position_embeddings}

    def router_mappings(self) -> list[ParamMapping]:
        return []

    def mapping_registry(self) -> MappingRegistry:
        return self.with_mtp_block(
            [
                *embeddings_and_output(self.tie_word_embeddings),
                *mla_attention(q_lora=self.hf_config.q_lora_rank is not None),
                *pre_mlp_norm(),
                *dense_mlp(),
                *routed_experts(),
                *self.router_mappings(),
                *shared_experts(SHARED),
            ]
        )


@register_bridge("DeepseekV3ForCausalLM")
class DeepseekV3Bridge(_DeepseekBridge):
    def check_supported(self) -> None:
        super().check_supported()
        c = self.hf_config
        for setting, known in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")):
            value = getattr(c, setting, None)
            if value not in (None, known):
                raise self.unsupported(setting, value, f"DeepSeek-V3's router is mapped ({setting} {known})")
        sigmoid_router_config(self)

    def router_config(self) -> dict[str, Any]:
        return sigmoid_router_config(self)

    def router_mappings(self) -> list[ParamMapping]:
        return [ReplicatedMapping(LAYER + "mlp.router.expert_bias", HF_LAYER + "mlp.gate.e_score_correction_bias")]


@register_bridge("DeepseekV2ForCausalLM")
class DeepseekV2Bridge(_DeepseekBridge):
    """V2's router: softmax scores, the top-k of them (within the best groups by their best score, for
    ``group_limited_greedy``) not renormalised, times ``routed_scaling_factor``."""

    def check_supported(self) -> None:
        super().check_supported()
        self.router_config()

    def router_config(self) -> dict[str, Any]:
        c = self.hf_config
        method = getattr(c, "topk_method", "greedy")
        groups, topk_group = getattr(c, "n_group", None) or 1, getattr(c, "topk_group", None) or 1
        fields: dict[str, Any] = {"moe_router_pre_softmax": True}
        if method == "group_limited_greedy" and groups > 1:
            if c.num_experts_per_tok // topk_group != 1:
                why = "transformers ranks the groups by their best score, Megatron-Core by the sum of their best "
                why += "num_experts_per_tok / topk_group"
                raise self.unsupported("topk_method", method, why)
            fields.update(moe_router_num_groups=groups, moe_router_group_topk=topk_group)
        elif method not in ("greedy", "group_limited_greedy"):
            raise self.unsupported("topk_method", method, "supported: greedy, group_limited_greedy")
        scaling = float(getattr(c, "routed_scaling_factor", 1.0) or 1.0)
        if scaling != 1.0:
            fields["moe_router_topk_scaling_factor"] = scaling
        return fields
