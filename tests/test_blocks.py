"""Mapping blocks under a family's own HF names: what the families to come (other q/k/v, router and expert names) rely on.

The registered families use the default names; ``test_architectures`` checks their tables tensor by tensor.
"""

from __future__ import annotations

from bridge.mappings import FusedRowsMapping
from bridge.mappings.hf_views import FusedExperts, Renamed
from bridge.models.blocks import (
    AttentionNames,
    ExpertNames,
    MLPNames,
    attention,
    dense_mlp,
    fused_expert_views,
    routed_experts,
    shared_experts,
)


def _table(mappings) -> dict[str, dict[str, str]]:
    return {m.megatron_param.removeprefix("decoder.layers.*."): m.hf_param for m in mappings}


def _layer(name: str) -> dict[str, str]:
    return {"": f"model.layers.*.{name}.weight"}


def test_attention_reads_the_names_it_is_given():
    names = AttentionNames(input_norm="ln_1", q="attn.wq", k="attn.wk", v="attn.wv", o="attn.wo", q_norm="attn.qn", k_norm="attn.kn")
    table = _table(attention(names, qkv_bias=True, qk_norm=True))
    qkv = {role: f"model.layers.*.attn.w{role}.%s" for role in "qkv"}
    assert table == {
        "input_layernorm.weight": _layer("ln_1"),
        "self_attention.linear_qkv.layer_norm_weight": _layer("ln_1"),
        "self_attention.linear_qkv.weight": {role: name % "weight" for role, name in qkv.items()},
        "self_attention.linear_qkv.bias": {role: name % "bias" for role, name in qkv.items()},
        "self_attention.q_layernorm.weight": _layer("attn.qn"),
        "self_attention.k_layernorm.weight": _layer("attn.kn"),
        "self_attention.linear_proj.weight": _layer("attn.wo"),
    }
    options = {"self_attention.linear_qkv.bias", "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"}
    assert set(_table(attention())) == set(table) - options


def test_mlp_blocks_read_the_names_they_are_given():
    ffn = MLPNames("ffn.", gate="w1", up="w3", down="w2")
    assert _table(dense_mlp(ffn, pre_norm="ln_2")) == {
        "mlp.linear_fc1.layer_norm_weight": _layer("ln_2"),
        "mlp.linear_fc1.weight": {"gate": "model.layers.*.ffn.w1.weight", "up": "model.layers.*.ffn.w3.weight"},
        "mlp.linear_fc2.weight": _layer("ffn.w2"),
    }
    experts = ExpertNames(router="moe.router", experts=MLPNames("moe.experts.*.", gate="w1", up="w3", down="w2"))
    assert _table(routed_experts(experts)) == {
        "mlp.router.weight": _layer("moe.router"),
        "mlp.experts.local_experts.*.linear_fc1.weight": {
            "gate": "model.layers.*.moe.experts.*.w1.weight",
            "up": "model.layers.*.moe.experts.*.w3.weight",
        },
        "mlp.experts.local_experts.*.linear_fc2.weight": _layer("moe.experts.*.w2"),
    }
    assert _table(shared_experts(MLPNames("mlp.shared_experts."))) == {
        "mlp.shared_experts.linear_fc1.weight": {
            "gate": "model.layers.*.mlp.shared_experts.gate_proj.weight",
            "up": "model.layers.*.mlp.shared_experts.up_proj.weight",
        },
        "mlp.shared_experts.linear_fc2.weight": _layer("mlp.shared_experts.down_proj"),
    }


def test_fused_expert_views_present_transformers_5_names_under_the_family_s_own():
    experts = ExpertNames(router="moe.router", experts=MLPNames("moe.experts.*.", gate="w1", up="w3", down="w2"))
    expert = "model.layers.*.moe.experts.{e}."
    assert fused_expert_views(experts) == (
        Renamed("model.layers.*.mlp.gate.weight", "model.layers.*.moe.router.weight"),
        FusedExperts("model.layers.*.mlp.experts.gate_up_proj", (expert + "w1.weight", expert + "w3.weight")),
        FusedExperts("model.layers.*.mlp.experts.down_proj", (expert + "w2.weight",)),
    )
    assert not any(isinstance(view, Renamed) for view in fused_expert_views())  # the router is already named mlp.gate


def test_fused_names_read_one_tensor_for_q_k_v_and_for_gate_up():
    """Phi-3's layout: ``qkv`` and ``gate_up`` replace the separate q/k/v and gate/up names."""
    attn = {
        m.megatron_param.removeprefix("decoder.layers.*."): m for m in attention(AttentionNames(qkv="self_attn.qkv_proj"), qkv_bias=True)
    }
    for suffix in ("weight", "bias"):
        qkv = attn[f"self_attention.linear_qkv.{suffix}"]
        assert isinstance(qkv, FusedRowsMapping) and qkv.hf_param == {"": f"model.layers.*.self_attn.qkv_proj.{suffix}"}
        assert list(qkv.inner.hf_param) == ["q", "k", "v"]
    mlp = _table(dense_mlp(MLPNames(gate_up="gate_up_proj")))
    assert mlp["mlp.linear_fc1.weight"] == _layer("mlp.gate_up_proj")
    assert mlp["mlp.linear_fc2.weight"] == _layer("mlp.down_proj")
    assert list(dense_mlp(MLPNames(gate_up="gate_up_proj"))[1].inner.hf_param) == ["gate", "up"]
