import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.tiny_checkpoints import TINY_MODELS, TINY_MOE_MODELS, build_tiny_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped where torch sees no CUDA device, so every tier runs on a CPU machine."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One small bf16 HF checkpoint per supported family (built once per test session)."""
    root = tmp_path_factory.mktemp("hf")
    return {name: build_tiny_checkpoint(name, root / name) for name in TINY_MODELS}


@pytest.fixture(scope="session")
def tiny_moe_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One small bf16 HF checkpoint per supported MoE family, per-expert tensor names (built once per test session)."""
    root = tmp_path_factory.mktemp("hf-moe")
    return {name: build_tiny_checkpoint(name, root / name) for name in TINY_MOE_MODELS}


@pytest.fixture(scope="module")
def demo(workdir) -> tuple[str, list[str]]:
    """The demo's tiny Llama and its preprocessed corpus blend, under the test module's own ``workdir`` fixture."""
    from bridge.training import prepare_demo

    hf, data_paths = prepare_demo(workdir / "demo")
    return str(hf), data_paths
