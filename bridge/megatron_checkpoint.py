"""Megatron-Core distributed checkpoints in Megatron-LM's folder layout.

    <root>/latest_checkpointed_iteration.txt     "release" or the iteration number
    <root>/release/ or <root>/iter_0000010/       a megatron.core.dist_checkpointing checkpoint

The state dict follows Megatron-LM: ``"model"`` (or ``"model0"``, ``"model1"``, … with virtual
pipeline stages) holds each chunk's ``sharded_state_dict()``; callers add ``"optimizer"``,
``"opt_param_scheduler"``, ``"iteration"`` and so on. Sharded keys do not depend on TP/PP, so a
checkpoint saved at one layout loads at another. dist_checkpointing writes ``metadata.json`` last:
a folder without it is incomplete and is not loaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

from bridge.transfer import unwrap_chunks

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"


class MegatronCheckpointError(ValueError):
    """A Megatron checkpoint folder is missing, incomplete or does not fit the model."""


def iteration_dir(root: str | Path, iteration: int | None) -> Path:
    """``root/release`` for ``None``, else ``root/iter_0000010``."""
    return Path(root) / ("release" if iteration is None else f"iter_{iteration:07d}")


def latest_iteration(root: str | Path) -> int | None:
    """The iteration the tracker file names (None for ``release``)."""
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        raise MegatronCheckpointError(f"{root} is not a Megatron checkpoint: no {TRACKER}")
    text = tracker.read_text().strip()
    return None if text == "release" else int(text)


def model_state_dict(model) -> dict:
    """Megatron-LM's model entries: ``model`` or ``model0``, ``model1``, … for virtual pipeline stages."""
    chunks = unwrap_chunks(model)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _check_writer_dependencies() -> None:
    # dist_checkpointing's writer processes import psutil; without it they die and the save hangs.
    if importlib.util.find_spec("psutil") is None:
        raise MegatronCheckpointError("saving a Megatron checkpoint needs the psutil package: pip install psutil")


def save_checkpoint(root: str | Path, state_dict: dict, iteration: int | None = None) -> Path:
    """Save ``state_dict`` (sharded entries from every rank) and point the tracker at it. All ranks call."""
    _check_writer_dependencies()
    folder = iteration_dir(root, iteration)
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state_dict, str(folder))
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = Path(root) / f".{TRACKER}.tmp"
        tmp.write_text("release" if iteration is None else str(iteration))
        os.replace(tmp, Path(root) / TRACKER)
    dist.barrier()
    logger.info("saved Megatron checkpoint %s", folder)
    return folder


def load_checkpoint(root: str | Path, state_dict: dict, iteration: int | None | str = "latest", strict: str = "assume_ok_unexpected") -> dict:
    """Load into the sharded ``state_dict`` (from ``model_state_dict`` plus the caller's entries). All ranks call."""
    if iteration == "latest":
        iteration = latest_iteration(root)
    folder = iteration_dir(root, iteration)  # type: ignore[arg-type]
    if not (folder / "metadata.json").exists():
        raise MegatronCheckpointError(f"{folder} is not a complete dist checkpoint (no metadata.json)")
    return dist_checkpointing.load(state_dict, str(folder), strict=strict)


def load_model(root: str | Path, model, iteration: int | None | str = "latest") -> None:
    """Load just the model weights of a checkpoint into ``model`` (any TP/PP layout)."""
    chunks = unwrap_chunks(model)
    loaded = load_checkpoint(root, model_state_dict(chunks), iteration)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys):
        chunk.load_state_dict(loaded[key], strict=False)
