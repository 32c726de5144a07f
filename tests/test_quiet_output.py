"""No noise a CPU user cannot act on (issue 19, item 8).

``hfmb -q`` prints the report and nothing else: no progress bars (ours or transformers'), no
torch.distributed.checkpoint note on a streamed export. The Python API shows no Apex / Transformer
Engine notices, no CUDA_DEVICE_MAX_CONNECTIONS advice and no non-leaf ``.grad`` warning while a model
converts and trains a step on CPU at TP=2 with sequence parallelism (where those appear).
Each command runs in a fresh interpreter, as a user's would.
"""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from tests.commands import ROOT, clean_env, hfmb

pytestmark = pytest.mark.distributed  # fresh interpreters that start ranks

NOISE = ("Apex", "Transformer Engine", "CUDA_DEVICE_MAX_CONNECTIONS", ".grad attribute", "Loading weights", "%|", "torch.distributed")


def _user_env() -> dict[str, str]:
    """Python's default warning filters, as a user's interpreter has them."""
    env = clean_env()
    del env["PYTHONWARNINGS"]
    return env


def test_quiet_import_and_export_print_only_the_report(tiny_checkpoints, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    for argv in (["import", str(tiny_checkpoints["llama"]), str(ckpt)], ["export", str(ckpt), str(out)]):
        done = hfmb("-q", *argv, env=_user_env())
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stderr == "", done.stderr
        assert done.stdout.startswith(f"{argv[0]}ed ")


SCRIPT = """
import itertools
import sys

import torch
from bridge import AutoBridge
from bridge.training import TrainingConfig, make_forward_step, setup_model_and_optimizer, train_step

bridge = AutoBridge.from_hf_pretrained(sys.argv[1], dtype=torch.float32)
cfg = TrainingConfig(train_iters=1, micro_batch_size=1, global_batch_size=1, seq_length=16, log_interval=1)
model, optimizer, scheduler = setup_model_and_optimizer(bridge, 2, 1, None, cfg)  # MoE at TP=2: sequence parallel
tokens = torch.arange(17).remainder(bridge.model_bridge.vocab_size)[None]
batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(1, 16), position_ids=torch.arange(16)[None])
result = train_step(make_forward_step(), [itertools.repeat(batch)], model, optimizer, scheduler, cfg, 1)
print("loss", result.loss)
"""


def test_the_python_api_shows_no_notices_while_converting_and_training(tiny_moe_checkpoints, tmp_path):
    script = tmp_path / "convert.py"
    script.write_text(textwrap.dedent(SCRIPT))
    argv = ["torchrun", "--nproc-per-node=2", str(script), str(tiny_moe_checkpoints["mixtral"])]
    done = subprocess.run(argv, capture_output=True, text=True, env=_user_env(), cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not [word for word in NOISE if word in done.stderr], done.stderr
