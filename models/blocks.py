"""Mapping blocks: the parameter mappings of one part of a decoder; a model's table is a list of blocks.

A block names HF tensors by their module path inside a layer (``model.layers.*.``, ``*`` the layer),
so a family that names them differently passes its own names. It lists every name Megatron-Core
gives a parameter: the local spec's and the Transformer Engine spec's, which fuses a norm into the
next linear (``linear_qkv.layer_norm_weight``, a dense MLP's ``linear_fc1.layer_norm_weight``). A name
the built model lacks is never matched.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.mappings import (
    GatedMLPMapping,
    ParamMapping,
    QKVMapping,
    ReplicatedMapping,
    RowParallelMapping,
    VocabParallelMapping,
    fused_gate_up,
    fused_qkv,
)
from bridge.mappings.hf_views import FusedExperts, Renamed

LAYER = "decoder.layers.*."
HF_LAYER = "model.layers.*."


def embeddings_and_output(
    tied: bool, *, embed: str = "model.embed_tokens.weight", final_norm: str = "model.norm.weight", lm_head: str = "lm_head.weight"
) -> list[ParamMapping]:
    """What lies outside the layers (full HF names): input embedding, output layer, final norm.

    Tied, the output layer (the last stage's copy of the embedding) loads the embedding and export skips it.
    """
    return [
        VocabParallelMapping("embedding.word_embeddings.weight", embed),
        VocabParallelMapping("output_layer.weight", embed if tied else lm_head, load_only=tied),
        ReplicatedMapping("decoder.final_layernorm.weight", final_norm),
    ]


def norm(hf: str, *megatron: str) -> list[ParamMapping]:
    """The weight of a layer's HF norm module ``hf`` under each of its Megatron parameter names (paths in a layer).

    The blocks' own norms go through it; so does a norm they do not cover (a post-norm, say).
    """
    return [ReplicatedMapping(LAYER + name, f"{HF_LAYER}{hf}.weight") for name in megatron]


@dataclass(frozen=True)
class AttentionNames:
    """HF module paths of a layer's self-attention and its input norm (Llama's names by default).

    ``qkv``: one module whose weight holds q rows, then k rows, then v rows (Phi-3), read instead of ``q``/``k``/``v``.
    ``input_norm`` None: the layer has no norm before attention (OLMo-2).
    """

    input_norm: str | None = "input_layernorm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    q_norm: str = "self_attn.q_norm"
    k_norm: str = "self_attn.k_norm"
    qkv: str | None = None


def attention(names: AttentionNames = AttentionNames(), *, qkv_bias: bool = False, qk_norm: bool = False) -> list[ParamMapping]:
    """Self-attention and its input norm: q/k/v (and their biases) fused into ``linear_qkv``, the output projection,
    and with ``qk_norm`` the norms of q and k (whole on every rank, per head or over the projection alike)."""

    def qkv(suffix: str) -> ParamMapping:
        megatron = f"{LAYER}self_attention.linear_qkv.{suffix}"
        if names.qkv:
            return fused_qkv(megatron, f"{HF_LAYER}{names.qkv}.{suffix}")
        q, k, v = (f"{HF_LAYER}{name}.{suffix}" for name in (names.q, names.k, names.v))
        return QKVMapping(megatron, q=q, k=k, v=v)

    input_norm = norm(names.input_norm, "input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight") if names.input_norm else []
    mappings = [*input_norm, qkv("weight")]
    if qkv_bias:
        mappings.append(qkv("bias"))
    if qk_norm:
        mappings += norm(names.q_norm, "self_attention.q_layernorm.weight") + norm(names.k_norm, "self_attention.k_layernorm.weight")
    return [*mappings, RowParallelMapping(f"{LAYER}self_attention.linear_proj.weight", f"{HF_LAYER}{names.o}.weight")]


def post_norms(attention: str = "post_attention_layernorm", mlp: str = "post_feedforward_layernorm") -> list[ParamMapping]:
    """The norms on the attention and the MLP outputs (``DecoderShape.post_norms``: OLMo-2, Gemma 2/3)."""
    return norm(attention, "post_self_attn_layernorm.weight") + norm(mlp, "post_mlp_layernorm.weight")


def pre_mlp_norm(hf: str = "post_attention_layernorm") -> list[ParamMapping]:
    """The norm before the MLP as a module of its own (local spec; TE spec in MoE layers); HF names it after attention."""
    return norm(hf, "pre_mlp_layernorm.weight")


@dataclass(frozen=True)
class MLPNames:
    """HF module paths of a SwiGLU MLP in a layer: its gate, up and down projections under ``prefix``.

    ``gate_up``: one module whose weight holds gate rows, then up rows (Phi-3), read instead of ``gate``/``up``.
    """

    prefix: str = "mlp."
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    gate_up: str | None = None


def gated_mlp(megatron: str, names: MLPNames) -> list[ParamMapping]:
    """A SwiGLU MLP under the Megatron module prefix ``megatron``: gate and up fused into ``linear_fc1``, down as ``linear_fc2``."""
    hf = HF_LAYER + names.prefix
    fc1 = megatron + "linear_fc1.weight"
    return [
        fused_gate_up(fc1, f"{hf}{names.gate_up}.weight")
        if names.gate_up
        else GatedMLPMapping(fc1, gate=f"{hf}{names.gate}.weight", up=f"{hf}{names.up}.weight"),
        RowParallelMapping(megatron + "linear_fc2.weight", f"{hf}{names.down}.weight"),
    ]


def dense_mlp(names: MLPNames = MLPNames(), *, pre_norm: str | None = "post_attention_layernorm") -> list[ParamMapping]:
    """A layer's dense MLP, with its pre-MLP norm under TE's fused name (``pre_mlp_norm`` maps the module of its own).

    ``pre_norm`` None: the layer has no norm before the MLP (OLMo-2).
    """
    fused_norm = norm(pre_norm, "mlp.linear_fc1.layer_norm_weight") if pre_norm else []
    return [*fused_norm, *gated_mlp(LAYER + "mlp.", names)]


@dataclass(frozen=True)
class ExpertNames:
    """HF names of a sparse MLP in a layer: its router, and the routed experts' MLP (``*`` in its prefix: the expert)."""

    router: str = "mlp.gate"
    experts: MLPNames = MLPNames(prefix="mlp.experts.*.")


def routed_experts(names: ExpertNames = ExpertNames()) -> list[ParamMapping]:
    """The router and each routed expert's SwiGLU MLP (Megatron's ``local_experts``, numbered over the whole model)."""
    return [
        ReplicatedMapping(LAYER + "mlp.router.weight", f"{HF_LAYER}{names.router}.weight"),
        *gated_mlp(LAYER + "mlp.experts.local_experts.*.", names.experts),
    ]


def fused_expert_views(names: ExpertNames = ExpertNames()) -> tuple[Renamed | FusedExperts, ...]:
    """transformers 5's fused layout (router ``mlp.gate``, ``mlp.experts.gate_up_proj``/``down_proj``) seen under ``names``.

    A checkpoint saved with ``save_original_format=False`` holds it; export writes ``names``.
    """
    experts = names.experts
    expert = HF_LAYER + experts.prefix.replace("*", "{e}")
    router = () if names.router == "mlp.gate" else (Renamed(HF_LAYER + "mlp.gate.weight", f"{HF_LAYER}{names.router}.weight"),)
    return (
        *router,
        FusedExperts(HF_LAYER + "mlp.experts.gate_up_proj", (f"{expert}{experts.gate}.weight", f"{expert}{experts.up}.weight")),
        FusedExperts(HF_LAYER + "mlp.experts.down_proj", (f"{expert}{experts.down}.weight",)),
    )


def mtp_layers(hf_config) -> tuple[str, ...]:
    """Patterns of the multi-token-prediction layers DeepSeek-V3 and GLM-4.5 checkpoints hold after the decoder
    (``model.layers.{num_hidden_layers + i}``, ``num_nextn_predict_layers`` of them), which transformers drops at
    load and the bridge carries unchanged into exports (``ModelBridge.hf_carried``)."""
    first, count = hf_config.num_hidden_layers, getattr(hf_config, "num_nextn_predict_layers", 0) or 0
    return tuple(rf"model\.layers\.{first + i}\..+" for i in range(count))


def shared_experts(names: MLPNames = MLPNames(prefix="mlp.shared_expert."), *, gate: str | None = None) -> list[ParamMapping]:
    """The shared experts every token goes through (one SwiGLU MLP), and the HF module of their sigmoid ``gate``, if any."""
    gated = [ReplicatedMapping(LAYER + "mlp.shared_experts.gate_weight", f"{HF_LAYER}{gate}.weight")] if gate else []
    return [*gated_mlp(LAYER + "mlp.shared_experts.", names), *gated]
