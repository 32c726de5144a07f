"""HF → Megatron → HF is bit-exact, and every rank's shard is the expected slice, at TP1/2 × PP1/2.

One group of 4 gloo processes runs the whole matrix (parallel state is torn down between layouts),
so the expensive imports happen once; the parametrised tests then read its results. A case that
raises fails its own tests only, with the rank's traceback (``tests/case_matrix.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bridge.runtime.local_launch import run_distributed
from tests.case_matrix import case_results, run_cases
from tests.tiny_checkpoints import TINY_MODELS

LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2)]  # (tp, pp, vpp)
WORLD = 4


def roundtrip_matrix(checkpoints: dict[str, str], out_root: str) -> dict:
    """Each (model, tp, pp, vpp) case on this rank: its shard checks after every load path, and rank 0's roundtrip."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from bridge import AutoBridge
    from bridge.checks.verify import compare_tensors, load_hf_tensors
    from bridge.engine import device_upload
    from bridge.engine import load as engine_load
    from tests.checks import check_model_shards, fill_nan

    device_upload.BLOCK_BYTES = 1000  # many blocks per tensor, some of a single row (a row of the tiny models is up to 1 KiB)

    def run_case(case: tuple[str, int, int, int | None]) -> dict:
        name, tp, pp, vpp = case
        src = checkpoints[name]
        parallel_state.destroy_model_parallel()
        bridge = AutoBridge.from_hf_pretrained(src)
        model = bridge.to_megatron_model(tp=tp, pp=pp, vpp=vpp)
        hf = load_hf_tensors(src)
        shard_problems, kinds = check_model_shards(model, bridge, hf)
        fill_nan(model)
        bridge.load_hf_weights(model, strategy="scatter")
        scatter_problems, _ = check_model_shards(model, bridge, hf)
        staged_problems = []
        for strategy in engine_load.LOAD_STRATEGIES:  # the GPU path (pinned blocks of rows), on the CPU, in blocks of a few rows
            fill_nan(model)
            engine_load.load_checkpoint(bridge.plan(model), bridge.reader, strategy=strategy, staged=True)
            staged_problems += [f"{strategy}: {problem}" for problem in check_model_shards(model, bridge, hf)[0]]
        out = Path(out_root) / f"{name}-tp{tp}-pp{pp}-vpp{vpp}"
        bridge.save_hf_pretrained(model, out)
        roundtrip = None
        if dist.get_rank() == 0:
            roundtrip = compare_tensors(hf, load_hf_tensors(out))
            roundtrip += [f"no {f}" for f in ("config.json", "model.safetensors.index.json", "tokenizer.json") if not (out / f).exists()]
        return {"shards": shard_problems, "scatter": scatter_problems, "staged": staged_problems, "kinds": kinds, "roundtrip": roundtrip}

    return run_cases([(name, tp, pp, vpp) for tp, pp, vpp in LAYOUTS for name in checkpoints], run_case)


@pytest.fixture(scope="module")
def matrix(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("roundtrip")
    return run_distributed(roundtrip_matrix, WORLD, {k: str(v) for k, v in tiny_checkpoints.items()}, str(out))


def test_comparison_sees_a_one_bit_difference():
    from bridge.checks.verify import compare_tensors

    a = {"w": torch.ones(3, dtype=torch.bfloat16)}
    b = {"w": torch.ones(3, dtype=torch.bfloat16)}
    b["w"][1] = 1 + 2**-7  # the next bfloat16 after 1
    assert compare_tensors(a, a) == [] and compare_tensors(a, b) == ["w: values differ (max abs diff 0.00781)"]
    assert compare_tensors(a, {}) == ["missing w"] and compare_tensors({}, a) == ["extra w"]


CASES = [
    pytest.param(name, tp, pp, vpp, id=f"{name}-tp{tp}-pp{pp}" + (f"-vpp{vpp}" if vpp else ""))
    for tp, pp, vpp in LAYOUTS
    for name in TINY_MODELS
]


@pytest.mark.parametrize("name,tp,pp,vpp", CASES)
@pytest.mark.distributed
def test_roundtrip_is_bit_exact(matrix, name, tp, pp, vpp):
    assert case_results(matrix, (name, tp, pp, vpp))[0]["roundtrip"] == []


@pytest.mark.parametrize("name,tp,pp,vpp", CASES)
@pytest.mark.distributed
def test_every_shard_is_the_expected_slice(matrix, name, tp, pp, vpp):
    results = case_results(matrix, (name, tp, pp, vpp))
    for rank, result in enumerate(results):
        assert result["shards"] == [], f"rank {rank}"
        assert result["scatter"] == [], f"rank {rank}, load_strategy='scatter'"
        assert result["staged"] == [], f"rank {rank}, staged load (the GPU path, on the CPU)"
    # every rank checked something, and across ranks every mapping kind was checked
    kinds = set().union(*(result["kinds"] for result in results))
    assert {"vocab", "qkv", "row", "gated_mlp", "replicated"} <= kinds
