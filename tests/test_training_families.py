"""The convert-and-train example on the families whose layers are the project's own: tiny Gemma 3 and OLMo-2 at TP2·PP2.

Each is converted, trained a few steps on Megatron-Core's engine (4 gloo ranks), exported, and the
export reloaded in transformers (the example generates with it); the exported weights are the trained
ones, not the source's.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from tests.commands import ROOT, clean_env
from tests.tiny_checkpoints import build_tiny_checkpoint

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """The demo corpus, tokenized with the demo tokenizer the tiny checkpoints share."""
    from bridge.training.data import prepare_demo

    _, data_paths = prepare_demo(tmp_path_factory.mktemp("demo"))
    return data_paths[1]


@pytest.mark.parametrize("name", ["gemma3", "olmo2"])
def test_example_trains_and_exports_at_tp2_pp2(tmp_path, corpus, name):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf = build_tiny_checkpoint(name, tmp_path / name, dtype=torch.float32)
    work = tmp_path / "work"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=4",
        str(ROOT / "examples" / "convert_and_train.py"),
        *("--hf-model", str(hf), "--data-path", corpus, "--workdir", str(work), "--tp", "2", "--pp", "2"),
        *("--train-iters", "12", "--log-interval", "3", "--seq-length", "32"),
    ]
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-5000:]
    losses = [float(loss) for loss in re.findall(r"^iteration \d+/12 \| loss ([\d.]+) ", text, re.M)]
    assert len(losses) == 4 and sum(losses[2:]) < sum(losses[:2]), losses  # random weights: the trend, not every step
    assert re.search(r"^exported to .*; transformers continues '.+' with '.+'$", text, re.M), text[-3000:]

    exported = work / "hf_export"
    AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)  # loads without missing or unexpected weights
    (source,) = hf.glob("*.safetensors")
    trained = {k: v for f in exported.glob("*.safetensors") for k, v in load_file(f).items()}
    before = load_file(source)
    assert trained.keys() == before.keys()
    norm = "model.layers.1.post_feedforward_layernorm.weight"
    assert not torch.equal(trained[norm], before[norm])
