"""The MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss): bit-exact roundtrips, expert shards and logits
at EP/ETP/TP/SP/VPP layouts.

One group of 4 gloo processes runs every layout (torn down between them); tests read its results.
A case that raises fails its own tests only, with the rank's traceback (``tests/case_matrix.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bridge import AutoBridge
from bridge.demo_model import VOCAB_SIZE
from bridge.megatron.parallel import ParallelConfigError
from bridge.runtime.local_launch import run_distributed
from tests.case_matrix import case_results, run_cases
from tests.tiny_checkpoints import TINY_MOE_MODELS, build_tiny_checkpoint, mxfp4_copy

LAYOUTS = {
    "tp1": {},
    "ep2": {"ep": 2},
    "tp2-sp": {"tp": 2},
    "tp2-ep2": {"tp": 2, "ep": 2},
    "tp2-ep2-etp1": {"tp": 2, "ep": 2, "etp": 1},
    "pp2-vpp2": {"pp": 2, "vpp": 2},
}
FUSED_LAYOUTS = ("tp1", "tp2-ep2-etp1")
# gpt-oss's released form: its experts in MXFP4 (read dequantized, written back in MXFP4).
MXFP4 = "gptoss-mxfp4"
MODELS = [*TINY_MOE_MODELS, MXFP4]
# Megatron-Core has expert biases (gpt-oss) only without expert TP: those models run the TP layouts at etp=1.
EXPERT_BIASES = {"gptoss", MXFP4}


def layout_sizes(name: str, layout: str) -> dict[str, int]:
    sizes = LAYOUTS[layout]
    return {**sizes, "etp": 1} if name in EXPERT_BIASES and sizes.get("tp", 1) > 1 else sizes


def moe_cases() -> list[tuple[str, str]]:
    """Every (model, layout), but one of the layouts that are the same for a model (gpt-oss: tp2-ep2 is tp2-ep2-etp1)."""
    cases = [(name, layout) for layout in LAYOUTS for name in MODELS]
    return [(n, layout) for n, layout in cases if not (n in EXPERT_BIASES and layout == "tp2-ep2")]


TOKENS = torch.randint(0, VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(1))


def _moe_names(name: str):
    from tests.checks import MOE_NAMES

    return MOE_NAMES["mixtral" if name == "mixtral" else "qwen"]


def dequantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with each MXFP4 pair ``X_blocks`` / ``X_scales`` replaced by ``X`` as transformers decodes it
    (its own function, in fp32: exact), in the bf16 checkpoints' ``[experts, in, out]`` layout."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out = dict(tensors)
    for name in [n for n in tensors if n.endswith("_blocks")]:
        stem = name.removesuffix("_blocks")
        out[stem] = convert_moe_packed_tensors(out.pop(name), out.pop(stem + "_scales"), dtype=torch.float32)
    return out


def moe_matrix(checkpoints: dict[str, str], fused: dict[str, str], out_root: str, tokens: torch.Tensor) -> dict:
    """Each (model, layout) case on this rank: shards, the fused checkpoint's load, logits where held, rank 0's roundtrip."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from bridge.checks.forward import megatron_logits
    from bridge.checks.verify import compare_tensors, load_hf_tensors
    from tests.checks import check_model_shards, fill_nan

    def run_case(case: tuple[str, str]) -> dict:
        name, layout = case
        src = checkpoints[name]
        parallel_state.destroy_model_parallel()
        bridge = AutoBridge.from_hf_pretrained(src)
        model = bridge.to_megatron_model(**layout_sizes(name, layout))
        hf = dequantized(load_hf_tensors(src))
        shards, kinds = check_model_shards(model, bridge, hf, _moe_names(name))
        fill_nan(model)
        bridge.load_hf_weights(model, strategy="scatter")  # one reader per TP (expert-TP) group sends the shards
        scatter, _ = check_model_shards(model, bridge, hf, _moe_names(name))
        result = {"shards": shards, "scatter": scatter, "kinds": kinds}
        if layout in FUSED_LAYOUTS and name in fused:
            before = {n: p.detach().clone() for chunk in model for n, p in chunk.named_parameters()}
            fused_bridge = AutoBridge.from_hf_pretrained(fused[name])
            fused_bridge.load_hf_weights(model)
            after = dict((n, p) for chunk in model for n, p in chunk.named_parameters())
            result["fused"] = [n for n in before if not torch.equal(before[n], after[n])]
        logits = megatron_logits(model, tokens, bridge.model_bridge.vocab_size)
        if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
            result["logits"] = logits
        out = Path(out_root) / f"{name}-{layout}"
        bridge.save_hf_pretrained(model, out, quantization="mxfp4" if name == MXFP4 else None)
        if dist.get_rank() == 0:
            result["roundtrip"] = compare_tensors(load_hf_tensors(src), load_hf_tensors(out))  # as stored: MXFP4 bytes too
        return result

    return run_cases([case for case in moe_cases() if case[0] in checkpoints], run_case)


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory) -> tuple[dict[str, Path], dict[str, Path]]:
    """fp32 per-expert checkpoints (gpt-oss also with its experts in MXFP4), and the same weights saved with
    transformers-5 fused expert names."""
    root = tmp_path_factory.mktemp("moe")
    per_expert = {n: build_tiny_checkpoint(n, root / n, dtype=torch.float32) for n in TINY_MOE_MODELS}
    fused = {n: build_tiny_checkpoint(n, root / f"{n}-fused", dtype=torch.float32, save_original_format=False) for n in TINY_MOE_MODELS}
    return {**per_expert, MXFP4: mxfp4_copy(per_expert["gptoss"], root / MXFP4)}, fused


@pytest.fixture(scope="module")
def results(moe_checkpoints, tmp_path_factory):
    per_expert, fused = moe_checkpoints
    out = tmp_path_factory.mktemp("moe-out")
    per_rank = run_distributed(
        moe_matrix, 4, {k: str(v) for k, v in per_expert.items()}, {k: str(v) for k, v in fused.items()}, str(out), TOKENS
    )
    return per_rank


@pytest.fixture(scope="module")
def hf_logits(moe_checkpoints):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return {
            n: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()(TOKENS).logits for n, p in moe_checkpoints[0].items()
        }


CASES = [pytest.param(n, layout, id=f"{n}-{layout}") for n, layout in moe_cases()]


def test_fused_checkpoint_is_really_fused(moe_checkpoints):
    from bridge.hf.reader import SafetensorsReader

    names = SafetensorsReader(moe_checkpoints[1]["qwen3_moe"]).names()
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and not any(".experts.0." in n for n in names)


def test_mxfp4_checkpoint_is_really_mxfp4(moe_checkpoints):
    from bridge.hf.reader import SafetensorsReader

    names = SafetensorsReader(moe_checkpoints[0][MXFP4]).names()
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in names and "model.layers.0.mlp.experts.gate_up_proj" not in names


@pytest.mark.parametrize("name,layout", CASES)
@pytest.mark.distributed
def test_moe_roundtrip_is_bit_exact(results, name, layout):
    assert case_results(results, (name, layout))[0]["roundtrip"] == []


@pytest.mark.parametrize("name,layout", CASES)
@pytest.mark.distributed
def test_every_expert_shard_is_the_expected_slice(results, name, layout):
    case = case_results(results, (name, layout))
    for rank, result in enumerate(case):
        assert result["shards"] == [], f"rank {rank}"
        assert result["scatter"] == [], f"rank {rank}, load_strategy='scatter'"
    kinds = set().union(*(result["kinds"] for result in case))
    assert {"expert_fc1", "expert_fc2", "router"} <= kinds


@pytest.mark.parametrize("name,layout", [c for c in CASES if c.values[1] in FUSED_LAYOUTS and c.values[0] != MXFP4])
@pytest.mark.distributed
def test_fused_expert_checkpoint_loads_the_same_weights(results, name, layout):
    for rank, result in enumerate(case_results(results, (name, layout))):
        assert result["fused"] == [], f"rank {rank}"


@pytest.mark.parametrize("name,layout", CASES)
@pytest.mark.distributed
def test_moe_logits_match_transformers(results, hf_logits, name, layout):
    (ours,) = [result["logits"] for result in case_results(results, (name, layout)) if "logits" in result]
    theirs = hf_logits[name]
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize(
    "sizes,message",
    [
        ({"ep": 3}, r"number of experts = 4 is not divisible by ep = 3; change ep"),
        ({"etp": 3}, r"expert FFN size \(moe_intermediate_size\) = 32 is not divisible by etp"),
    ],
)
def test_expert_sizes_that_do_not_divide_fail_early(moe_checkpoints, sizes, message):
    bridge = AutoBridge.from_hf_pretrained(moe_checkpoints[0]["qwen3_moe"])
    with pytest.raises(ParallelConfigError, match=message):
        bridge.to_megatron_model(**sizes)


def test_router_setting_megatron_cannot_express_is_named(moe_checkpoints, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(moe_checkpoints[0]["mixtral"], tmp_path / "gelu-mixtral")
    config = json.loads((folder / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="hidden_act='gelu'"):
        AutoBridge.from_hf_pretrained(folder)
