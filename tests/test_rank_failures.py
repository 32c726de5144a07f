"""Any failure of any rank ends the run within seconds and says which rank and why (issue 19, item 1).

Injected failures in ranks started by ``run_distributed`` (what ``hfmb`` uses without torchrun): an
exception of a type nothing expects, a rank killed by SIGKILL while its peer waits in a collective,
and one killed while its peer is busy outside any collective (nothing would ever wake that peer).
Each run is given a timeout far above the time a failure may take, so a hang fails the test as a
``TimeoutError``; the peer must be gone afterwards. Under torchrun, a killed rank ends the job too,
and ``hfmb`` whose output pipe is closed exits 2 with one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from bridge.runtime.local_launch import RankFailedError, run_distributed
from tests.commands import HFMB

pytestmark = pytest.mark.distributed

HANG_LIMIT_S = 240  # far above what any of these failures may take; reaching it means a hang


def _raise_on_rank_1(kind: str) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise {"permission": PermissionError(13, "Permission denied"), "pipe": BrokenPipeError(32, "Broken pipe")}[kind]
    dist.barrier()


def _kill_rank_1(peer: str, pid_file: str) -> None:
    """Rank 1 dies by SIGKILL; rank 0 waits in a barrier, or sleeps outside any collective."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    Path(pid_file).write_text(str(os.getpid()))
    if peer == "collective":
        dist.barrier()
    else:
        time.sleep(10 * HANG_LIMIT_S)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/status").read_text().count("zombie") > 0


@pytest.mark.parametrize("kind", ["permission", "pipe"])
def test_an_unexpected_exception_on_one_rank_ends_the_run_naming_it(kind):
    with pytest.raises(RankFailedError, match=r"rank 1 failed:[\s\S]*(PermissionError|BrokenPipeError)"):
        run_distributed(_raise_on_rank_1, 2, kind, timeout=HANG_LIMIT_S)


@pytest.mark.parametrize("peer", ["collective", "busy"])
def test_a_killed_rank_ends_the_run_naming_the_signal(peer, tmp_path):
    pid_file = tmp_path / "rank0.pid"
    with pytest.raises(RankFailedError, match="rank 1 was killed by SIGKILL"):
        run_distributed(_kill_rank_1, 2, peer, str(pid_file), timeout=HANG_LIMIT_S)
    assert _gone(int(pid_file.read_text())), "rank 0 outlived the failed run"


TORCHRUN_SCRIPT = """
import os, signal, time
from bridge.megatron.parallel import init_distributed
import torch.distributed as dist

init_distributed()
if dist.get_rank() == 1:
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)
dist.barrier()
print("no failure seen", flush=True)
"""


def test_under_torchrun_a_killed_rank_ends_the_job(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT))
    done = subprocess.run(
        ["torchrun", "--nproc-per-node=2", str(script)], capture_output=True, text=True, timeout=HANG_LIMIT_S, cwd=tmp_path
    )
    assert done.returncode != 0 and "no failure seen" not in done.stdout
    assert "SIGKILL" in done.stderr, done.stderr[-2000:]


def test_a_closed_output_pipe_exits_2_with_one_line(tiny_checkpoints):
    proc = subprocess.Popen(
        [*HFMB, "plan", str(tiny_checkpoints["llama"]), "--tp", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # the reader is gone before the report is written, as `| head` is once it has its lines
    stderr = proc.stderr.read()
    assert proc.wait(timeout=HANG_LIMIT_S) == 2, stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert errors == ["hfmb plan: error: the output was closed before the report was written (a pipe such as `| head` stopped reading)"]
