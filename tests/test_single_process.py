"""The same calls work in one plain process (no torchrun): TP=PP=1, a world of one set up on demand."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bridge.hf.folder import CheckpointError, resolve_hf_folder

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch.distributed as dist
    from megatron.core import parallel_state
    from bridge import AutoBridge
    from bridge.megatron.parallel import ParallelConfigError
    from bridge.checks.verify import compare_hf_folders

    src, out = sys.argv[1], sys.argv[2]
    bridge = AutoBridge.from_hf_pretrained(src)
    model = bridge.to_megatron_model()
    assert dist.get_world_size() == 1 and parallel_state.get_tensor_model_parallel_world_size() == 1
    pairs = dict(bridge.export_hf_weights(model))
    bridge.save_hf_pretrained(model, out)
    assert compare_hf_folders(src, out) == [], compare_hf_folders(src, out)
    assert sorted(pairs) == sorted(__import__("bridge.checks.verify").checks.verify.load_hf_tensors(src))
    bridge.to_megatron_model()  # reuses the parallel state set up above
    try:
        bridge.to_megatron_model(tp=1, pp=1, vpp=2)
    except ParallelConfigError as err:
        print("refused:", err)
    print("SINGLE PROCESS OK")
    """
)


@pytest.mark.distributed
def test_convert_and_export_without_torchrun(tiny_checkpoints, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_checkpoints["qwen3"]), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert "SINGLE PROCESS OK" in result.stdout, result.stderr[-3000:]
    assert "refused: vpp > 1 needs pp > 1" in result.stdout


def test_unknown_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="no-such-org/no-such-model"):
        resolve_hf_folder("no-such-org/no-such-model")
