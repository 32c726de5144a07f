"""``hfmb`` in a fresh interpreter, as a user runs it: what the tests that need a real process share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HFMB = (sys.executable, "-m", "bridge")
# torchrun's variables of an enclosing run: a command started from a test must be a world of its own.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without a launcher's variables, with warnings off unless ``extra`` says otherwise."""
    env = {key: value for key, value in os.environ.items() if key not in _LAUNCHER_VARIABLES}
    return {**env, "PYTHONWARNINGS": "ignore", **extra}


def hfmb(*argv: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``hfmb ARGV`` to its end; stdout and stderr captured as text."""
    return subprocess.run([*HFMB, *argv], capture_output=True, text=True, env=env or clean_env(), cwd=ROOT, timeout=timeout)
