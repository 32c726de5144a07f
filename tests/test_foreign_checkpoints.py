"""Checkpoints written elsewhere export and verify when their HF config is named (issue 19, item 4).

A checkpoint in Megatron-LM's layout without the record ``hfmb import`` writes (``bridge.json``,
``hf_config/``), as Megatron-LM's own training or another converter leaves it: ``hfmb export`` refuses
it and says how to name its config; with ``--hf-config`` (the original HF folder) the export, streamed
and in memory, gives the original back bit for bit; ``hfmb verify HF CKPT`` takes the HF folder as its
config. A config whose model does not fit the checkpoint is refused naming the first tensor that
does not fit, before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bridge.checks.verify import compare_hf_folders
from bridge.runtime.local_launch import run_distributed
from tests.test_cli import EXIT_CHECK, EXIT_INPUT, EXIT_OK, _cli

pytestmark = pytest.mark.distributed


def session(hf: str, wider: str, root: str) -> dict:
    """Every command of the tests, on one rank."""
    out = Path(root)
    ckpt = out / "ckpt"
    results: dict = {"import": _cli("import", hf, str(ckpt))}
    shutil.rmtree(ckpt / "hf_config")
    (ckpt / "bridge.json").unlink()  # now it is as another tool wrote it
    results["no_config"] = _cli("export", str(ckpt), str(out / "refused"))
    for how, extra in (("streamed", ()), ("in_memory", ("--in-memory",))):
        target = out / f"hf-{how}"
        results[how] = _cli("export", str(ckpt), str(target), "--hf-config", hf, *extra)
        results[f"{how}_differences"] = compare_hf_folders(hf, target) if target.exists() else None
        results[f"wider_{how}"] = _cli("export", str(ckpt), str(out / f"wider-{how}"), "--hf-config", wider, *extra)
    results["verify"] = _cli("verify", hf, str(ckpt))
    results["left"] = sorted(p.name for p in out.iterdir())
    return results


@pytest.fixture(scope="module")
def results(tiny_checkpoints, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("foreign")
    hf = tiny_checkpoints["llama"]
    wider = shutil.copytree(hf, root / "wider")  # the same model with a wider MLP: its fc1/fc2 do not fit
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    return run_distributed(session, 1, str(hf), str(wider), str(root / "out"))[0]


def test_a_checkpoint_without_its_record_says_how_to_name_its_config(results):
    code, stdout, stderr = results["no_config"]
    assert code == EXIT_INPUT and "name it with --hf-config DIR" in stderr, stdout + stderr


@pytest.mark.parametrize("how", ["streamed", "in_memory"])
def test_export_with_its_hf_config_gives_the_original_back(results, how):
    assert results["import"][0] == EXIT_OK, results["import"]
    code, stdout, stderr = results[how]
    assert code == EXIT_OK, stdout + stderr
    assert results[f"{how}_differences"] == []


@pytest.mark.parametrize("how", ["streamed", "in_memory"])
def test_a_config_that_does_not_fit_is_refused_naming_the_tensor(results, how):
    code, stdout, stderr = results[f"wider_{how}"]
    assert code == EXIT_INPUT, stdout + stderr
    misfits = (  # the first one the path checks: either MLP weight
        "tensor decoder.layers.mlp.linear_fc1.weight is [4, 256, 64], the model of this config needs [4, 512, 64]",
        "tensor decoder.layers.mlp.linear_fc2.weight is [4, 64, 128], the model of this config needs [4, 64, 256]",
    )
    assert any(misfit in stderr for misfit in misfits), stderr
    assert f"wider-{how}" not in results["left"]


def test_verify_takes_the_hf_folder_as_the_config(results):
    code, stdout, stderr = results["verify"]
    assert code == EXIT_OK and "VERIFY PASSED" in stdout, stdout + stderr
    assert EXIT_CHECK != code
