"""Values are imported as stored or refused, and compared bit for bit (issue 20, items 7 and 8).

* A tensor stored as int8, bool, uint8 or fp8 where the model needs a float weight is refused,
  naming it and its dtype, by the API's load and by ``hfmb import`` (streaming and in memory), before
  any weight moves; ``hfmb plan`` lists it as a problem.
* ``hfmb verify A B`` compares bytes: identical folders holding a NaN pass, a +0.0 / -0.0 flip fails.
* NaN/Inf in weights is reported per tensor by ``hfmb plan`` and ``hfmb import`` (a warning, not a
  failure), counted in bounded blocks as the tensors stream.

One spawned rank runs every command in-process (``bridge.cli.main``) at TP=PP=1; the tests read
its results.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from bridge.runtime.local_launch import run_distributed
from tests.edited_checkpoints import edited_copy
from tests.test_cli import EXIT_CHECK, EXIT_INPUT, EXIT_OK, _cli

# kind → (dtype stored, the float weight stored in it): one of each mapping kind (row, replicated, vocab, QKV).
NON_FLOAT = {
    "int8": (torch.int8, "model.layers.1.mlp.down_proj.weight"),
    "bool": (torch.bool, "model.layers.0.input_layernorm.weight"),
    "uint8": (torch.uint8, "model.embed_tokens.weight"),
    "float8_e4m3fn": (torch.float8_e4m3fn, "model.layers.2.self_attn.q_proj.weight"),
}
EMBED, UP = "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"
ZEROED = "model.layers.0.self_attn.o_proj.weight"


def _stored_as(dtype: torch.dtype, name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name].float().mul(10).to(dtype)

    return edit


def _nan_and_inf(tensors: dict[str, torch.Tensor]) -> None:
    """Two NaN in embedding rows (rows a verify prompt need not touch) and an Inf in an MLP weight."""
    tensors[EMBED][7, 3] = float("nan")
    tensors[EMBED][249, 0] = float("nan")
    tensors[UP][0, 0] = float("inf")


def _zero(sign: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[ZEROED][0, 0] = sign * 0.0

    return edit


def _api_load(folder: str) -> tuple[str | None, str]:
    """``to_megatron_model(load_weights=True)`` at TP=PP=1: the error's type and message, if any."""
    from megatron.core import parallel_state

    from bridge import AutoBridge

    try:
        AutoBridge.from_hf_pretrained(folder).to_megatron_model()
    except Exception as err:  # the test inspects the message
        return type(err).__name__, str(err)
    finally:
        parallel_state.destroy_model_parallel()
    return None, ""


def _written(out: Path) -> bool:
    return out.exists() and any(out.iterdir())


def session(folders: dict[str, str], root: str) -> dict:
    """Every command of the tests, on one rank."""
    out = Path(root)
    results: dict = {}
    for kind in NON_FLOAT:
        results[("api", kind)] = _api_load(folders[kind])
        results[("plan", kind)] = _cli("plan", folders[kind])
        for how, extra in (("import", ()), ("import_in_memory", ("--in-memory",))):
            target = out / f"ckpt-{kind}-{how}"
            results[(how, kind)] = (*_cli("import", folders[kind], str(target), *extra), _written(target))
    results["plan_nan"] = _cli("plan", folders["nan"])
    results["import_nan"] = _cli("import", folders["nan"], str(out / "ckpt-nan"), "--max-memory", "64MB")
    results["import_nan_in_memory"] = _cli("import", folders["nan"], str(out / "ckpt-nan-in-memory"), "--in-memory")
    results["verify_nan_copies"] = _cli("verify", folders["nan"], folders["nan_copy"])
    results["verify_zero_signs"] = _cli("verify", folders["plus_zero"], folders["minus_zero"])
    return results


@pytest.fixture(scope="module")
def results(tiny_checkpoints, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fidelity")
    llama = tiny_checkpoints["llama"]
    folders = {kind: edited_copy(llama, root / kind, _stored_as(dtype, name)) for kind, (dtype, name) in NON_FLOAT.items()}
    folders["nan"] = edited_copy(llama, root / "nan", _nan_and_inf)
    folders["nan_copy"] = shutil.copytree(folders["nan"], root / "nan_copy")
    folders["plus_zero"] = edited_copy(llama, root / "plus_zero", _zero(1.0))
    folders["minus_zero"] = edited_copy(llama, root / "minus_zero", _zero(-1.0))
    return run_distributed(session, 1, {k: str(v) for k, v in folders.items()}, str(root / "out"))[0]


def _names_tensor_and_dtype(kind: str) -> str:
    """What a refusal must say: the tensor, its file and the dtype it is stored in."""
    return rf"{re.escape(NON_FLOAT[kind][1])} in model\.safetensors is {kind}"


# ---------------------------------------------------------------- item 7: non-float weights are refused


@pytest.mark.parametrize("kind", list(NON_FLOAT))
@pytest.mark.distributed
def test_the_api_refuses_a_non_float_weight(results, kind):
    error, message = results[("api", kind)]
    assert error == "CheckpointError", message
    assert re.search(_names_tensor_and_dtype(kind), message), message


@pytest.mark.parametrize("how", ["import", "import_in_memory"])
@pytest.mark.parametrize("kind", list(NON_FLOAT))
@pytest.mark.distributed
def test_import_refuses_a_non_float_weight_before_writing(results, kind, how):
    code, stdout, stderr, written = results[(how, kind)]
    assert code == EXIT_INPUT, stdout + stderr
    assert re.search(_names_tensor_and_dtype(kind), stderr), stderr
    assert not written


@pytest.mark.parametrize("kind", list(NON_FLOAT))
@pytest.mark.distributed
def test_plan_lists_a_non_float_weight_as_a_problem(results, kind):
    code, stdout, stderr = results[("plan", kind)]
    assert code == EXIT_CHECK, stdout + stderr
    assert "PLAN FAILED" in stdout and re.search(_names_tensor_and_dtype(kind), stdout), stdout


# ---------------------------------------------------------------- item 8: bytes, and NaN/Inf reported


NAN_LINES = [
    f"WARNING: {EMBED} holds 2 NaN and 0 Inf of 16,000 values",
    f"WARNING: {UP} holds 0 NaN and 1 Inf of 8,192 values",
]


@pytest.mark.distributed
def test_plan_reports_nan_and_inf_per_tensor(results):
    code, stdout, stderr = results["plan_nan"]
    assert code == EXIT_OK, stdout + stderr
    assert [line for line in stdout.splitlines() if line.startswith("WARNING")] == NAN_LINES, stdout


@pytest.mark.parametrize("how", ["import_nan", "import_nan_in_memory"])
@pytest.mark.distributed
def test_import_reports_nan_and_inf_per_tensor(results, how):
    code, stdout, stderr = results[how]
    assert code == EXIT_OK, stdout + stderr
    assert [line for line in stdout.splitlines() if line.startswith("WARNING")] == NAN_LINES, stdout


@pytest.mark.distributed
def test_verify_passes_identical_folders_holding_a_nan(results):
    code, stdout, stderr = results["verify_nan_copies"]
    assert code == EXIT_OK and "VERIFY PASSED" in stdout, stdout + stderr


@pytest.mark.distributed
def test_verify_fails_folders_that_differ_in_the_sign_of_a_zero(results):
    code, stdout, stderr = results["verify_zero_signs"]
    assert code == EXIT_CHECK and "VERIFY FAILED" in stdout, stdout + stderr
    assert f"DIFFERENT {ZEROED}: values differ (1 elements equal as numbers but not in their bits" in stdout, stdout


def test_comparison_is_bit_for_bit():
    from bridge.checks.verify import compare_tensors

    nan = {"w": torch.tensor([1.0, float("nan"), 0.0], dtype=torch.bfloat16)}
    assert compare_tensors(nan, {"w": nan["w"].clone()}) == []
    minus_zero = {"w": torch.tensor([1.0, float("nan"), -0.0], dtype=torch.bfloat16)}
    assert compare_tensors(nan, minus_zero) == [
        "w: values differ (1 elements equal as numbers but not in their bits: +0.0 vs -0.0 or NaN payloads)"
    ]
    other_nan = {"w": nan["w"].clone()}
    other_nan["w"].view(torch.int16)[1] ^= 1  # another NaN payload
    assert compare_tensors(nan, other_nan) != []
    one = {"w": torch.tensor([1.0, 1.0, 0.0], dtype=torch.bfloat16)}
    assert compare_tensors(nan, one) == ["w: values differ (NaN on one side only in 1 elements)"]
    assert compare_tensors({"m": torch.tensor([True, False])}, {"m": torch.tensor([True, True])}) == ["m: values differ (max abs diff 1)"]


def test_counting_reads_a_tensor_in_bounded_blocks(tmp_path, monkeypatch):
    """Counting streams a tensor in blocks of at most ``COUNT_BLOCK_BYTES`` and counts across their edges."""
    from safetensors.torch import save_file

    from bridge.hf import weight_values
    from bridge.hf.reader import SafetensorsReader
    from bridge.hf.weight_values import NonFinite, nonfinite_counts

    weight = torch.randn(100, 8)
    weight[0, 0] = weight[57, 3] = float("nan")
    weight[99, 7] = float("-inf")
    save_file(
        {"w": weight, "scalar": torch.tensor(float("inf")), "fine": torch.ones(4), "ids": torch.zeros(3, dtype=torch.int64)},
        tmp_path / "model.safetensors",
    )
    monkeypatch.setattr(weight_values, "COUNT_BLOCK_BYTES", 3 * 8 * 4)  # three rows
    reads: list[torch.Size] = []
    read = SafetensorsReader.read

    def recorded_read(self, tensor, index):
        block = read(self, tensor, index)
        reads.append(block.shape)
        return block

    monkeypatch.setattr(SafetensorsReader, "read", recorded_read)
    counts = nonfinite_counts(SafetensorsReader(tmp_path), ["w", "scalar", "fine", "ids", "not-there"])
    assert counts == {"w": NonFinite(2, 1, 800), "scalar": NonFinite(0, 1, 1)}  # int64 "ids" is not counted
    assert max(shape.numel() for shape in reads) == 3 * 8  # never more than three rows at once
    assert len(reads) == 34 + 1 + 1  # w in 34 blocks, the scalar and "fine" in one each
