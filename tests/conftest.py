import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bridge.tiny_checkpoints import TINY_MODELS, build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One small bf16 HF checkpoint per supported family (built once per test session)."""
    root = tmp_path_factory.mktemp("hf")
    return {name: build_tiny_checkpoint(name, root / name) for name in TINY_MODELS}
