"""Per-architecture unit tests that start no process: config translation, refusals, every mapping's shards.

For each tiny model, the bridge's ``TransformerConfig`` / ``GPTModel`` fields are checked against its
config.json and tensors, each family's refusals against the setting they must name, and every
Megatron parameter's shard at TP 1, 2 and 4, built by its mapping alone, against the independent
layouts of ``tests/checks.py`` bit for bit (and exported back to the HF tensors). The distributed
matrices check the same through real models and ranks; these run in seconds.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from bridge.mappings import MappingContext, materialize
from bridge.mappings.hf_views import split_stacked_name
from safetensors.torch import load_file

from bridge import AutoBridge, UnsupportedArchitectureError
from tests.checks import IMAGE_TEXT_PREFIX, MOE_NAMES, expected_shard, same_bits, text_model_tensors
from tests.tiny_checkpoints import TINY_MODELS, TINY_MOE_MODELS, build_tiny_checkpoint

MODELS = [*TINY_MODELS, *TINY_MOE_MODELS]
# TP 4 needs 4 query groups: the shard test runs it on a variant of each model with 8 heads in 4 groups.
WIDE = {"num_attention_heads": 8, "num_key_value_heads": 4}
VOCAB_DIVISOR = 128  # Megatron-LM's make_vocab_size_divisible_by, which the bridge uses by default


@pytest.fixture(scope="module")
def folders(tiny_checkpoints, tiny_moe_checkpoints) -> dict[str, Path]:
    return {**tiny_checkpoints, **tiny_moe_checkpoints}


@pytest.fixture(scope="module")
def wide_folders(tmp_path_factory) -> dict[str, Path]:
    """Each tiny model with 8 heads in 4 query groups, so that TP 4 divides them."""
    root = tmp_path_factory.mktemp("wide")
    return {name: build_tiny_checkpoint(name, root / name, **WIDE) for name in MODELS}


def _config(folder: Path) -> dict[str, Any]:
    """config.json as written, read without transformers or the bridge."""
    return json.loads((folder / "config.json").read_text())


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, read by safetensors itself rather than the bridge's reader."""
    return {name: tensor for path in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(path).items()}


def _text_model(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """config.json, the tensors of the text model and the prefix they are stored under: for an image-text
    checkpoint, its ``text_config`` and ``language_model.`` tensors (named without it)."""
    cfg, hf = _config(folder), _hf_tensors(folder)
    if "text_config" not in cfg:
        return cfg, hf, ""
    return cfg["text_config"], text_model_tensors(hf), IMAGE_TEXT_PREFIX


def _layer_tensors(hf: dict[str, torch.Tensor], layer: int) -> set[str]:
    prefix = f"model.layers.{layer}."
    return {name[len(prefix) :] for name in hf if name.startswith(prefix)}


def _is_moe_layer(hf: dict[str, torch.Tensor], layer: int) -> bool:
    """A layer is sparse when transformers built routed experts for it (per-expert names on disk, or gpt-oss's stacked ones)."""
    return any(re.match(r"(mlp|block_sparse_moe)\.experts\.(0\.|gate_up_proj$)", name) for name in _layer_tensors(hf, layer))


# ---------------------------------------------------------------- config translation


@pytest.mark.parametrize("name", MODELS)
def test_config_translation_carries_the_hf_values(folders, name):
    """Each Megatron field against config.json, or the saved tensors where the config leaves it implicit."""
    folder = folders[name]
    cfg, hf, _ = _text_model(folder)
    model_bridge = AutoBridge.from_hf_pretrained(folder).model_bridge
    got, gpt = model_bridge.transformer_config_kwargs(), model_bridge.gpt_model_kwargs()
    layer0 = _layer_tensors(hf, 0)
    want = {
        "num_layers": cfg["num_hidden_layers"],
        "hidden_size": cfg["hidden_size"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_query_groups": cfg["num_key_value_heads"],
        "kv_channels": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        "ffn_hidden_size": cfg["intermediate_size"],
        "layernorm_epsilon": cfg["rms_norm_eps"],
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "add_bias_linear": "self_attn.o_proj.bias" in layer0,  # gpt-oss: every linear has a bias
        "add_qkv_bias": "self_attn.q_proj.bias" in layer0,  # what the checkpoint holds decides
        "qk_layernorm": "self_attn.q_norm.weight" in layer0,
    }
    mla = "self_attn.kv_b_proj.weight" in layer0  # DeepSeek's multi-latent attention: its own heads' dims and latent norms
    if mla:
        for key in ("num_query_groups", "kv_channels", "add_qkv_bias"):
            del want[key]
        q_lora = "self_attn.q_a_proj.weight" in layer0
        want |= {
            "multi_latent_attention": True,
            "q_lora_rank": hf["model.layers.0.self_attn.q_a_proj.weight"].shape[0] if q_lora else None,
            "kv_lora_rank": hf["model.layers.0.self_attn.kv_a_layernorm.weight"].shape[0],
            "qk_head_dim": cfg["qk_nope_head_dim"],
            "qk_pos_emb_head_dim": hf["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape[0] - cfg["kv_lora_rank"],
            "v_head_dim": hf["model.layers.0.self_attn.kv_b_proj.weight"].shape[0] // cfg["num_attention_heads"] - cfg["qk_nope_head_dim"],
            "qk_layernorm": True,  # the latent norms are Megatron's q/kv layernorms
        }
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
    if experts:
        moe_layers = [_is_moe_layer(hf, layer) for layer in range(cfg["num_hidden_layers"])]
        first = moe_layers.index(True)
        gate = re.compile(rf"model\.layers\.{first}\.(mlp|block_sparse_moe)\.experts\.0\.(gate_proj|w1)\.weight")
        stacked = hf.get(f"model.layers.{first}.mlp.experts.gate_up_proj")  # gpt-oss: [experts, hidden, 2 × ffn]
        expert_ffn = stacked.shape[2] // 2 if stacked is not None else next(t for n, t in hf.items() if gate.fullmatch(n)).shape[0]
        shared = cfg.get("shared_expert_intermediate_size") or cfg.get("moe_intermediate_size", 0) * cfg.get("n_shared_experts", 0) or None
        sigmoid = f"model.layers.{first}.mlp.gate.e_score_correction_bias" in hf  # DeepSeek-V3's router (GLM-4.5)
        want |= {
            "num_moe_experts": experts,
            "moe_ffn_hidden_size": expert_ffn,
            "moe_router_topk": cfg["num_experts_per_tok"],
            # Megatron's pre-softmax top-k keeps the softmax weights; transformers renormalises them when
            # norm_topk_prob says so (Mixtral always does, and has no such setting).
            "moe_router_pre_softmax": not cfg.get("norm_topk_prob", True),
            "moe_layer_freq": [int(is_moe) for is_moe in moe_layers],
            "moe_shared_expert_intermediate_size": shared,
            "moe_shared_expert_gate": f"model.layers.{first}.mlp.shared_expert_gate.weight" in hf,  # Qwen2-MoE's gated shared expert
            "moe_router_score_function": "sigmoid" if sigmoid else "softmax",
            "moe_router_enable_expert_bias": sigmoid or None,
            "moe_router_load_balancing_type": "aux_loss" if cfg["output_router_logits"] else "none",
        }
        numbers = {re.search(r"\.experts\.(\d+)\.", n).group(1) for n in hf if ".experts." in n and stacked is None}
        if sigmoid:  # groups (when more than one) and the weights' scale
            groups = cfg["n_group"] > 1
            want |= {
                "moe_router_num_groups": cfg["n_group"] if groups else None,
                "moe_router_group_topk": cfg["topk_group"] if groups else None,
                "moe_router_topk_scaling_factor": cfg["routed_scaling_factor"],
            }
        assert experts == (stacked.shape[0] if stacked is not None else len(numbers))
    else:
        assert not got.get("num_moe_experts")
    assert {key: got.get(key) for key in want} == want
    gemma = cfg["model_type"].startswith("gemma")  # Gemma's norms scale by 1 + w, its MLPs use the tanh GeLU
    assert bool(got.get("layernorm_zero_centered_gamma")) == gemma
    act = got["activation_func"]
    if (cfg.get("hidden_activation") or cfg["hidden_act"]) == "gelu_pytorch_tanh":  # Gemma 1 sets the latter
        assert act.func is F.gelu and act.keywords == {"approximate": "tanh"}
    elif "swiglu_limit" in cfg:  # gpt-oss: (clamp(up, ±limit) + 1) · g · sigmoid(alpha · g), g = clamp(gate, max=limit)
        x = torch.linspace(-3, 3, 13)
        assert torch.equal(act(x), x * torch.sigmoid(cfg["swiglu_alpha"] * x))
        assert (got["activation_func_clamp_value"], got["glu_linear_offset"]) == (cfg["swiglu_limit"], 1.0)
        assert got["softmax_type"] == "learnable"
    else:
        assert act is F.silu and cfg["hidden_act"] == "silu"
    scalar = cfg.get("query_pre_attn_scalar")
    assert got.get("softmax_scale") == (scalar**-0.5 if scalar else None)

    per_kind_rope = cfg["rope_parameters"]
    rope = per_kind_rope.get("full_attention", per_kind_rope)  # Gemma 3: the model's rope is the full layers'
    assert gpt["max_sequence_length"] == cfg["max_position_embeddings"]
    if mla:  # MLA's rope is its own (YaRN as released, rounding its correction range), the model has none
        assert "rotary_base" not in gpt and got["rotary_base"] == rope["rope_theta"]
        yarn = rope["rope_type"] == "yarn"
        assert got["rope_type"] == ("yarn" if yarn else "rope")
        assert got["rotary_scaling_factor"] == (rope["factor"] if yarn else 1.0)
        assert got["mscale_all_dim"] == (rope.get("mscale_all_dim") or 0.0)
    elif rope["rope_type"] == "llama3":
        assert gpt["rope_scaling"] is True and gpt["rope_scaling_factor"] == rope["factor"]
    elif rope["rope_type"] == "linear":
        assert not gpt.get("rope_scaling") and gpt["seq_len_interpolation_factor"] == rope["factor"]
    elif rope["rope_type"] == "yarn":
        assert gpt["position_embedding_type"] == "yarn"
        yarn = model_bridge.rope_config_kwargs()
        assert yarn["yarn_rotary_scaling_factor"] == rope["factor"]
        assert yarn["yarn_original_max_position_embeddings"] == rope["original_max_position_embeddings"]
        assert (yarn["yarn_beta_fast"], yarn["yarn_beta_slow"]) == (rope["beta_fast"], rope["beta_slow"])
        assert yarn["yarn_correction_range_round_to_int"] == rope.get("truncate", True)
    else:
        assert not gpt.get("rope_scaling") and "seq_len_interpolation_factor" not in gpt
    if not mla:
        assert gpt["rotary_base"] == rope["rope_theta"]
    assert gpt.get("rotary_percent", 1.0) == rope.get("partial_rotary_factor", 1.0)
    # HF attends to the last sliding_window keys including the query's own; Megatron counts those to its left.
    window = cfg.get("sliding_window")
    assert got.get("window_size") == ((window - 1, 0) if window else None)
    kinds = cfg.get("layer_types")  # per-layer windows: Megatron-Core's window_attn_skip_freq as a list
    assert got.get("window_attn_skip_freq") == ([int(k == "sliding_attention") for k in kinds] if kinds and window else None)
    # The layer's shape, read off the tensors: pre-norms, norms on the sublayer outputs, q/k norms per head or per projection.
    shape = model_bridge.decoder_shape
    assert shape.pre_norms == ("input_layernorm.weight" in layer0)
    assert shape.post_norms == ("post_feedforward_layernorm.weight" in layer0)
    if got["qk_layernorm"] and not mla:
        per_head = hf["model.layers.0.self_attn.q_norm.weight"].numel() == got["kv_channels"]
        assert shape.qk_norm == ("head" if per_head else "projection")
    assert shape.embedding_scale == gemma
    assert shape.attn_logit_softcap == cfg.get("attn_logit_softcapping")
    assert shape.final_logit_softcap == cfg.get("final_logit_softcapping")
    sliding_rope = (per_kind_rope.get("sliding_attention") or {}).get("rope_theta")  # Gemma 3: a rope of the sliding layers' own
    assert shape.sliding_rope_base == sliding_rope


# ---------------------------------------------------------------- refusals

_LLAMA3_ROPE = TINY_MODELS["llama3.1"][1]["rope_parameters"]
_YARN = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64}
_PHI4_MINI_ROPE = TINY_MODELS["phi4-mini"][1]["rope_parameters"]
_GEMMA3_ROPE = TINY_MODELS["gemma3"][1]["rope_parameters"]
# Phi-4-mini's LongRoPE (one factor per rotated pair of dims: 16 × 0.75 / 2), and Phi-3-mini-128k's in the legacy form
_LONGROPE = {**_PHI4_MINI_ROPE, "rope_type": "longrope", "short_factor": [1.0] * 6, "long_factor": [4.0] * 6}
_LEGACY_LONGROPE = {
    "rope_parameters": None,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8},
}


def _refusal(name: str, edits: dict[str, Any], setting: str, *marks: pytest.MarkDecorator):
    """A case of ``test_unsupported_setting_is_refused_by_name``: model, config.json edits, how the error names the setting."""
    return pytest.param(name, edits, setting, marks=marks, id=f"{name}-{setting}")


REFUSALS = [
    _refusal("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    _refusal("llama", {"attention_bias": True}, "attention_bias=True"),
    _refusal("llama", {"mlp_bias": True}, "mlp_bias=True"),
    _refusal(
        "llama3.1",
        {"rope_parameters": {**_LLAMA3_ROPE, "partial_rotary_factor": 0.5}},  # transformers' llama3 rope then rotates half of each head
        "partial_rotary_factor=0.5",
    ),
    _refusal("llama", {"rope_parameters": {**_YARN, "attention_factor": 2.0}}, "rope_parameters.attention_factor=2.0"),
    _refusal("llama3.1", {"rope_parameters": {**_LLAMA3_ROPE, "low_freq_factor": 2.0}}, "rope_parameters.low_freq_factor=2.0"),
    _refusal(
        "llama3.2",
        {"rope_parameters": {**_LLAMA3_ROPE, "original_max_position_embeddings": 4096}},
        "rope_parameters.original_max_position_embeddings=4096",
    ),
    _refusal("mistral", {"hidden_act": "relu"}, "hidden_act='relu'"),
    _refusal("qwen2", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window=True"),
    _refusal("qwen3", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window=True"),
    _refusal("qwen3", {"attention_bias": True}, "attention_bias=True"),
    _refusal("mixtral", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    _refusal("glm4_moe", {"norm_topk_prob": False}, "norm_topk_prob=False"),
    _refusal("deepseek_v3", {"topk_method": "greedy"}, "topk_method='greedy'"),
    _refusal("deepseek_v3", {"rope_interleave": False}, "rope_interleave=False"),
    _refusal("deepseek_v3", {"rope_parameters": {**_YARN, "truncate": False}}, "rope_parameters.truncate=False"),
    # V2's group_limited_greedy ranks groups by their best score; Megatron-Core by the sum of the best topk / topk_group = 2
    _refusal(
        "deepseek_v2_lite", {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}, "topk_method='group_limited_greedy'"
    ),
    _refusal("glm4_moe", {"topk_group": 2}, "topk_group=2"),  # Megatron would rank the groups by their best 2 // 2 scores
    _refusal("qwen2_moe", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window=True"),
    _refusal("qwen3_moe", {"attention_bias": True}, "attention_bias=True"),
    _refusal("qwen3_moe", {"rope_parameters": {**_YARN, "attention_factor": 1.5}}, "rope_parameters.attention_factor=1.5"),
    _refusal(  # partial rotary is mapped only where a family declares it (Phi-3)
        "mistral", {"rope_parameters": {**_PHI4_MINI_ROPE, "partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"
    ),
    _refusal("phi3", {"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
    _refusal("phi4-mini", {"rope_parameters": _LONGROPE, "original_max_position_embeddings": 64}, "rope_parameters.rope_type='longrope'"),
    _refusal("phi3", {**_LEGACY_LONGROPE, "original_max_position_embeddings": 64}, "rope_parameters.rope_type='longrope'"),
    _refusal("gemma3", {"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
    _refusal("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    _refusal("gemma3", {"layer_types": ["sliding_attention", "chunked_attention"] * 2}, "layer_types='chunked_attention'"),
    _refusal(
        "gemma3",
        {"rope_parameters": {**_GEMMA3_ROPE, "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}},
        "rope_parameters.sliding_attention.rope_type='linear'",
    ),
    _refusal("gemma2", {"attention_bias": True}, "attention_bias=True"),
    _refusal("olmo2", {"attention_bias": True}, "attention_bias=True"),
    _refusal("olmo2", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    _refusal("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0"),
    _refusal(  # 16 × 0.7 = 11 rotated dims: odd, untested
        "phi4-mini", {"rope_parameters": {**_PHI4_MINI_ROPE, "partial_rotary_factor": 0.7}}, "partial_rotary_factor=0.7"
    ),
]


@pytest.mark.parametrize("name,edits,setting", REFUSALS)
def test_unsupported_setting_is_refused_by_name(folders, tmp_path, name, edits, setting):
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(folders[name] / "config.json", folder)
    (folder / "config.json").write_text(json.dumps({**_config(folder), **edits}))
    with pytest.raises(UnsupportedArchitectureError, match=re.escape(f"{setting} is not supported")) as refused:
        AutoBridge.from_hf_pretrained(folder)
    assert str(refused.value).startswith(_config(folder)["architectures"][0] + ":")


def test_latent_ranks_tp_does_not_divide_are_refused_by_name(folders, tmp_path):
    """MLA's down projections are split over TP along their rows (the local spec): q_lora_rank and kv_lora_rank + the rope dims."""
    from bridge.megatron.builder import check_parallel_sizes
    from bridge.megatron.parallel import ParallelConfigError, ParallelSizes

    shutil.copy(folders["deepseek_v3"] / "config.json", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**_config(tmp_path), "kv_lora_rank": 15, "q_lora_rank": 30}))
    bridge = AutoBridge.from_hf_pretrained(tmp_path).model_bridge
    with pytest.raises(ParallelConfigError, match=r"kv_lora_rank \+ qk_rope_head_dim = 23 is not divisible by tp = 2"):
        check_parallel_sizes(bridge, ParallelSizes(tp=2))
    with pytest.raises(ParallelConfigError, match=r"q_lora_rank = 30 is not divisible by tp = 4"):
        check_parallel_sizes(bridge, ParallelSizes(tp=4))


def test_phi3_legacy_rope_keys_are_read(folders, tmp_path):
    """Phi-3 / Phi-4-mini config.json files predating transformers 5: ``rope_theta``, ``partial_rotary_factor`` at the top."""
    legacy = {**_config(folders["phi4-mini"]), "rope_parameters": None, "rope_scaling": None, "rope_theta": 250000.0}
    (tmp_path / "config.json").write_text(json.dumps({**legacy, "partial_rotary_factor": 0.75}))
    gpt = AutoBridge.from_hf_pretrained(tmp_path).model_bridge.gpt_model_kwargs()
    assert gpt["rotary_base"] == 250000.0 and gpt["rotary_percent"] == 0.75


# ---------------------------------------------------------------- every mapping's shards

_LAYER_PARAMS = {  # HF tensor in a layer → the Megatron parameter it is the first (or only) part of, local layer spec
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.q_proj.weight": "self_attention.linear_qkv.weight",
    "self_attn.q_proj.bias": "self_attention.linear_qkv.bias",
    "self_attn.qkv_proj.weight": "self_attention.linear_qkv.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.linear_fc1.weight",
    "mlp.gate_up_proj.weight": "mlp.linear_fc1.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "block_sparse_moe.gate.weight": "mlp.router.weight",
    "mlp.shared_expert.gate_proj.weight": "mlp.shared_experts.linear_fc1.weight",
    "mlp.shared_expert.down_proj.weight": "mlp.shared_experts.linear_fc2.weight",
    "mlp.shared_expert_gate.weight": "mlp.shared_experts.gate_weight",
    "mlp.shared_experts.gate_proj.weight": "mlp.shared_experts.linear_fc1.weight",
    "mlp.shared_experts.down_proj.weight": "mlp.shared_experts.linear_fc2.weight",
    "mlp.gate.e_score_correction_bias": "mlp.router.expert_bias",
    "self_attn.q_a_proj.weight": "self_attention.linear_q_down_proj.weight",  # DeepSeek's multi-latent attention
    "self_attn.q_a_layernorm.weight": "self_attention.q_layernorm.weight",
    "self_attn.q_b_proj.weight": "self_attention.linear_q_up_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "self_attention.linear_kv_down_proj.weight",
    "self_attn.kv_a_layernorm.weight": "self_attention.kv_layernorm.weight",
    "self_attn.kv_b_proj.weight": "self_attention.linear_kv_up_proj.weight",
    "post_feedforward_layernorm.weight": "post_mlp_layernorm.weight",
    "pre_feedforward_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.bias": "self_attention.linear_proj.bias",
    "self_attn.sinks": "self_attention.core_attention.softmax_offset",
    "mlp.router.weight": "mlp.router.weight",
    "mlp.router.bias": "mlp.router.bias",
}
# gpt-oss's stacked expert tensors (dim 0: the expert) → the parameter of each expert
_STACKED_EXPERTS = {
    "mlp.experts.gate_up_proj": "linear_fc1.weight",
    "mlp.experts.gate_up_proj_bias": "linear_fc1.bias",
    "mlp.experts.down_proj": "linear_fc2.weight",
    "mlp.experts.down_proj_bias": "linear_fc2.bias",
}
# In a DeepSeek-V2-Lite layer (MLA without q_lora) q_proj is MLA's plain query projection.
_MLA_LAYER_PARAMS = {**_LAYER_PARAMS, "self_attn.q_proj.weight": "self_attention.linear_q_proj.weight"}
# In a layer with post-norms (OLMo-2) HF's post_attention_layernorm normalises the attention output.
_POST_NORM_LAYER_PARAMS = {**_LAYER_PARAMS, "post_attention_layernorm.weight": "post_self_attn_layernorm.weight"}
_EXPERT = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|w1|down_proj|w2)\.weight")
# HF tensors that join the parameter of an earlier one (k/v into q's QKV, up into gate's fc1).
_LATER_PARTS = re.compile(
    r"self_attn\.[kv]_proj\.(weight|bias)|mlp\.(shared_experts?\.)?up_proj\.weight|(mlp|block_sparse_moe)\.experts\.\d+\.(up_proj|w3)\.weight"
)


def _megatron_names(hf: dict[str, torch.Tensor]) -> list[str]:
    """Every Megatron parameter the checkpoint's tensors make (global layer and expert numbers), read off the HF names.

    The output layer is listed for tied models too: the last pipeline stage holds a copy of the embedding.
    """
    names = ["embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"]
    outside = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    unknown = sorted(n for n in hf if n not in outside and not n.startswith("model.layers."))
    layers = sorted({int(n.split(".")[2]) for n in hf if n.startswith("model.layers.")})
    for layer in layers:
        tensors = _layer_tensors(hf, layer)
        params = _POST_NORM_LAYER_PARAMS if "post_feedforward_layernorm.weight" in tensors else _LAYER_PARAMS
        params = _MLA_LAYER_PARAMS if "self_attn.kv_b_proj.weight" in tensors else params
        for rest in sorted(tensors):
            expert = _EXPERT.fullmatch(rest)
            if rest in params:
                names.append(f"decoder.layers.{layer}.{params[rest]}")
            elif expert:
                fc = "linear_fc1" if expert.group(2) in ("gate_proj", "w1") else "linear_fc2"
                names.append(f"decoder.layers.{layer}.mlp.experts.local_experts.{expert.group(1)}.{fc}.weight")
            elif rest in _STACKED_EXPERTS:
                experts = hf[f"model.layers.{layer}.{rest}"].shape[0]
                names += [f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{_STACKED_EXPERTS[rest]}" for e in range(experts)]
            elif not _LATER_PARTS.fullmatch(rest):
                unknown.append(f"model.layers.{layer}.{rest}")
    assert not unknown, f"HF tensors this test does not know the Megatron parameter of: {unknown}"
    return names


def _hf_tensor(hf: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``hf[name]``, or for a slice name ``stacked[i]`` (gpt-oss's experts) that slice of the stacked tensor."""
    split = split_stacked_name(name)
    return hf[name] if split is None else hf[split[0]][split[1]]


CASES = [pytest.param(name, tp, id=f"{name}-tp{tp}") for name in MODELS for tp in (1, 2, 4)]


@pytest.mark.parametrize("name,tp", CASES)
def test_every_mapping_gives_the_expected_shard_and_exports_it_back(folders, wide_folders, name, tp):
    """Each TP rank's shard from ``shard_parts`` and from ``hf_to_megatron`` into a parameter, against
    ``expected_shard``; then all ranks' shards exported back to the HF tensors. Routed experts are split
    over expert-TP, here of the same size."""
    folder = (wide_folders if tp == 4 else folders)[name]
    cfg, hf, prefix = _text_model(folder)
    registry = AutoBridge.from_hf_pretrained(folder).model_bridge.mapping_registry()
    padded = -(-cfg["vocab_size"] // (VOCAB_DIVISOR * tp)) * VOCAB_DIVISOR * tp
    ctx = MappingContext(
        tp_rank=0,
        tp_size=tp,
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg["num_key_value_heads"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"],
        padded_vocab_size=padded,
    )
    oracle = dict(
        groups=cfg["num_key_value_heads"],
        tied=cfg["tie_word_embeddings"],
        tp=tp,
        padded_vocab=padded,
        etp=tp,
        moe_names=MOE_NAMES["mixtral" if name == "mixtral" else "qwen"],
    )
    problems, kinds, exported = [], set(), []
    for param in _megatron_names(hf):
        mapping = registry.resolve(param)
        assert all(hf_name.startswith(prefix) for hf_name in mapping.hf_names), mapping
        mapping.hf_param = {role: hf_name[len(prefix) :] for role, hf_name in mapping.hf_param.items()}
        inputs = {role: _hf_tensor(hf, hf_name) for role, hf_name in mapping.hf_param.items()}
        shards = []
        for rank in range(tp):
            kind, want = expected_shard(param, hf, rank=rank, etp_rank=rank, **oracle)
            kinds.add(kind)
            rank_ctx = replace(ctx, tp_rank=rank)
            if not same_bits(torch.cat(mapping.shard_parts(inputs, rank_ctx)), want):
                problems.append(f"{param} ({kind}) rank {rank}: shard_parts")
            loaded = mapping.hf_to_megatron(inputs, rank_ctx, out=torch.full(want.shape, float("nan"), dtype=want.dtype))
            if not same_bits(loaded, want):
                problems.append(f"{param} ({kind}) rank {rank}: hf_to_megatron into a parameter")
            shards.append(loaded)
        if mapping.load_only:
            continue
        shards = shards if mapping.tp_sharded else shards[:1]
        for hf_name, tensor in mapping.megatron_to_hf(shards, ctx).items():
            exported.append(hf_name)
            if not same_bits(materialize(tensor), _hf_tensor(hf, hf_name)):
                problems.append(f"{param} ({kind}): export of {hf_name}")
    assert not problems, "\n".join(problems)
    # every HF tensor written back, once (a stacked one: each of its slices once)
    whole = {split[0] if (split := split_stacked_name(name)) else name for name in exported}
    slices = Counter(split[0] for name in exported if (split := split_stacked_name(name)))
    assert len(set(exported)) == len(exported) and sorted(whole) == sorted(hf)
    assert all(count == hf[name].shape[0] for name, count in slices.items())
    assert {"vocab", "column" if "model.layers.0.self_attn.kv_b_proj.weight" in hf else "qkv", "row", "replicated"} <= kinds
    assert ({"expert_fc1", "expert_fc2", "router"} if name in TINY_MOE_MODELS else {"gated_mlp"}) <= kinds
