"""Broken copies of the tiny checkpoints, for the tests of bad input."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file


def edited_copy(src: str | Path, dst: str | Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    """Copy the checkpoint folder ``src`` to ``dst`` and rewrite its single weights file through ``edit(tensors)``."""
    dst = Path(dst)
    shutil.copytree(src, dst)
    (weights,) = dst.glob("*.safetensors")
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return dst
