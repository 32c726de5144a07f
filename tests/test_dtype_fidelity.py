"""The stored dtypes are the truth (issue 20, item 6).

Three checkpoints whose config.json contradicts their files, as published checkpoints do: fp16
weights under a config saying bfloat16, bf16 weights holding fp16 subnormals and values beyond fp16's
range under a config saying float16, one fp32 tensor in a bf16 checkpoint. By default ``hfmb import``
(streaming and in memory) casts nothing lossily, says how the files and the config disagree (as does
``hfmb plan``), and the export gives back every tensor bit for bit. Asking for the config's dtype
casts, the import says what it rounds, ``bridge.json`` records it, and the export says that the
roundtrip is no longer exact (and it is not).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bridge.checks.verify import compare_hf_folders
from bridge.runtime.local_launch import run_distributed
from tests.edited_checkpoints import edited_copy
from tests.test_cli import EXIT_OK, _cli
from tests.tiny_checkpoints import build_tiny_checkpoint

NORM, UP = "model.norm.weight", "model.layers.0.mlp.up_proj.weight"


def _fp16_extremes(tensors: dict[str, torch.Tensor]) -> None:
    """bf16 values fp16 cannot hold: subnormals of fp16 (rounded), one below its smallest subnormal (0), one beyond its max (inf)."""
    tensors[UP][0, :4] = torch.tensor([1.0e-6, 3.1e-7, 1.0e-39, 7.0e4], dtype=torch.bfloat16)


def _norm_in_fp32(tensors: dict[str, torch.Tensor]) -> None:
    """One norm kept in fp32, with values (full 24-bit mantissas) that bf16 rounds."""
    tensors[NORM] = 1.0 + torch.randn(tensors[NORM].shape, generator=torch.Generator().manual_seed(0)) / 3


def _say_config_dtype(folder: Path, dtype: str) -> Path:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = dtype
    path.write_text(json.dumps(config, indent=2))
    return folder


# case → (the params dtype by default, the config's dtype, which the lossy import asks for)
CASES = {
    "fp16_under_bf16_config": ("float16", "bfloat16"),
    "bf16_under_fp16_config": ("bfloat16", "float16"),
    "fp32_tensor_in_bf16": ("float32", "bfloat16"),
}
HOWS = {"streamed": (), "in_memory": ("--in-memory",)}


def session(folders: dict[str, str], root: str) -> dict:
    """Every command of the tests, on one rank: plan, import (default and lossy), export, compared with the original."""
    from bridge import AutoBridge

    out = Path(root)
    results: dict = {}
    for case, folder in folders.items():
        results[("api", case)] = str(AutoBridge.from_hf_pretrained(folder).dtype)
        results[("plan", case)] = _cli("plan", folder)
        for how, extra in HOWS.items():
            ckpt, back = out / f"{case}-{how}", out / f"{case}-{how}-hf"
            results[("import", case, how)] = _cli("import", folder, str(ckpt), *extra)
            results[("export", case, how)] = _cli("export", str(ckpt), str(back), *extra)
            results[("differences", case, how)] = compare_hf_folders(folder, back)
        ckpt, back = out / f"{case}-cast", out / f"{case}-cast-hf"
        results[("import", case, "cast")] = _cli("import", folder, str(ckpt), "--dtype", CASES[case][1])
        results[("bridge.json", case)] = json.loads((ckpt / "bridge.json").read_text())
        results[("export", case, "cast")] = _cli("export", str(ckpt), str(back))
        results[("differences", case, "cast")] = compare_hf_folders(folder, back)
    return results


@pytest.fixture(scope="module")
def results(tiny_checkpoints, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dtypes")
    llama = tiny_checkpoints["llama"]
    folders = {
        "fp16_under_bf16_config": _say_config_dtype(build_tiny_checkpoint("llama", root / "fp16", dtype=torch.float16), "bfloat16"),
        "bf16_under_fp16_config": _say_config_dtype(edited_copy(llama, root / "bf16", _fp16_extremes), "float16"),
        "fp32_tensor_in_bf16": edited_copy(llama, root / "mixed", _norm_in_fp32),
    }
    return run_distributed(session, 1, {k: str(v) for k, v in folders.items()}, str(root / "out"))[0]


def _notes(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("NOTE:")]


def _disagreement(case: str) -> str:
    params, config = CASES[case]
    stored = {
        "fp16_under_bf16_config": "the weights are stored as 39 float16 tensors",
        "bf16_under_fp16_config": "the weights are stored as 39 bfloat16 tensors",
        "fp32_tensor_in_bf16": f"the weights are stored as 38 bfloat16 and 1 float32 tensors (e.g. {NORM} is float32)",
    }[case]
    return (
        f"NOTE: config.json says dtype {config}; {stored}: the parameters are {params}, which holds every stored value exactly "
        f"(ask for dtype {config}, --dtype in hfmb, to cast)"
    )


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.distributed
def test_the_api_keeps_the_stored_dtypes(results, case):
    assert results[("api", case)] == f"torch.{CASES[case][0]}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.distributed
def test_plan_shows_the_disagreement(results, case):
    code, stdout, stderr = results[("plan", case)]
    assert code == EXIT_OK, stdout + stderr
    assert f"params dtype: {CASES[case][0]} (weights stored as " in stdout, stdout
    assert _notes(stdout) == [_disagreement(case)], stdout


@pytest.mark.parametrize("how", list(HOWS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.distributed
def test_default_roundtrip_is_bit_exact_and_reported(results, case, how):
    code, stdout, stderr = results[("import", case, how)]
    assert code == EXIT_OK, stdout + stderr
    assert f"dtype torch.{CASES[case][0]}" in stdout and _notes(stdout) == [_disagreement(case)], stdout
    code, stdout, stderr = results[("export", case, how)]
    assert code == EXIT_OK, stdout + stderr
    assert _notes(stdout) == [], stdout
    assert results[("differences", case, how)] == []


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.distributed
def test_a_cast_asked_for_is_recorded_and_the_export_says_it_is_not_exact(results, case):
    config = CASES[case][1]
    rounded = {"fp16_under_bf16_config": "39 float16", "bf16_under_fp16_config": "39 bfloat16", "fp32_tensor_in_bf16": "1 float32"}[case]
    code, stdout, stderr = results[("import", case, "cast")]
    assert code == EXIT_OK, stdout + stderr
    note = f"NOTE: dtype {config} (asked for) does not hold every value of {rounded} stored weight(s)"
    assert len(_notes(stdout)) == 1 and note in stdout, stdout
    assert results[("bridge.json", case)]["dtype_cast"]["to"] == config
    code, stdout, stderr = results[("export", case, "cast")]
    assert code == EXIT_OK, stdout + stderr
    note = f"NOTE: no longer a guaranteed bit-exact roundtrip of the original checkpoint: the import cast {rounded} weight(s) to {config}"
    assert note in stdout, stdout
    assert results[("differences", case, "cast")] != []  # and indeed it is not


def test_holds_exactly_covers_range_precision_and_subnormals():
    from bridge.hf.dtype_choice import holds_exactly

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert [holds_exactly(fp32, d) for d in (bf16, fp16, fp32, torch.float64)] == [True, True, True, False]
    assert not holds_exactly(bf16, fp16) and not holds_exactly(fp16, bf16)  # precision one way, range the other
    assert holds_exactly(bf16, torch.float8_e4m3fn) and holds_exactly(fp16, torch.float8_e5m2)
    sample = torch.tensor([1.0e-6, 1.0e-39, 7.0e4], dtype=bf16)
    assert not torch.equal(sample.to(fp16).to(bf16), sample)  # the rule agrees with what a cast does


def test_choice_prefers_the_config_where_it_is_exact_and_refuses_float64():
    from bridge.hf.dtype_choice import choose_param_dtype
    from bridge.hf.folder import CheckpointError

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert choose_param_dtype({"w": bf16}, fp32, None).params == fp32  # exact, and what transformers would load
    assert choose_param_dtype({"w": bf16}, None, None).params == bf16
    assert choose_param_dtype({"w": bf16, "n": fp16}, bf16, None).params == fp32
    assert choose_param_dtype({"w": fp32}, bf16, bf16).rounded == {"w": fp32}
    assert choose_param_dtype({"w": bf16}, bf16, None).notes() == []
    with pytest.raises(CheckpointError, match=r"weight x is stored as float64.*--dtype float32"):
        choose_param_dtype({"x": torch.float64, "w": bf16}, bf16, None)
