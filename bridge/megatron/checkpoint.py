"""Megatron-Core distributed checkpoints in Megatron-LM's folder layout.

    <root>/latest_checkpointed_iteration.txt     "release" or the iteration number
    <root>/release/ or <root>/iter_0000010/       a megatron.core.dist_checkpointing checkpoint

The state dict follows Megatron-LM: ``"model"`` (or ``"model0"``, ``"model1"``, … with virtual
pipeline stages) holds each chunk's ``sharded_state_dict()``; callers add ``"optimizer"``,
``"opt_param_scheduler"``, ``"iteration"`` and so on. Sharded keys do not depend on TP/PP, so a
checkpoint saved at one layout loads at another (given the same padded vocabulary size).
dist_checkpointing writes ``metadata.json`` last: a folder without it is incomplete and is not loaded.

A checkpoint made from an HF checkpoint also carries what exporting it back needs, so that no HF
folder is required then:

    <root>/hf_config/        the source's config.json, generation config and tokenizer files
    <root>/bridge.json       architecture, source, the parallel sizes and dtype it was saved with,
                             the (padded) vocabulary size and the source's per-tensor dtypes
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.base import StrategyAction, register_default_strategy
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonSaveStrategy

from bridge.hf.folder import dtype_named, read_json
from bridge.megatron.chunks import unwrap_chunks
from bridge.runtime.process_lifetime import checkpoint_helpers_die_with_this_process
from bridge.runtime.rank_errors import on_rank0
from bridge.runtime.write_errors import disk_full_reported

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
HF_CONFIG_DIR = "hf_config"
SOURCE_INFO = "bridge.json"
SOURCE_INFO_FORMAT = "hf-megatron-bridge/1"
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version


class MegatronCheckpointError(ValueError):
    """A Megatron checkpoint folder is missing, incomplete or does not fit the model."""


def iteration_dir(root: str | Path, iteration: int | None) -> Path:
    """``root/release`` for ``None``, else ``root/iter_0000010``."""
    return Path(root) / ("release" if iteration is None else f"iter_{iteration:07d}")


def complete_iteration(root: str | Path, iteration: int | str | None = "latest") -> tuple[int | None, Path]:
    """The iteration asked for (``"latest"``: the tracker's; ``"release"`` or None: the release) and its folder.

    Raises ``MegatronCheckpointError`` when ``root`` does not exist or that folder is not a complete dist checkpoint.
    """
    if not Path(root).exists():
        raise MegatronCheckpointError(f"the checkpoint folder {root} does not exist")
    number = latest_iteration(root) if iteration == "latest" else iteration
    number = None if number in (None, "release") else int(number)
    folder = iteration_dir(root, number)
    if not (folder / "metadata.json").is_file():
        raise MegatronCheckpointError(f"{folder} is not a complete dist checkpoint (no metadata.json)")
    return number, folder


def latest_iteration(root: str | Path) -> int | None:
    """The iteration the tracker file names (None for ``release``)."""
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        raise MegatronCheckpointError(f"{root} is not a Megatron checkpoint: no {TRACKER}")
    text = tracker.read_text(errors="replace").strip()
    if text == "release":
        return None
    if not text.isdecimal():
        raise MegatronCheckpointError(f"{tracker} says {text[:80]!r}; expected an iteration number or 'release'")
    return int(text)


def release_state(model_state: dict) -> dict:
    """A model state dict as Megatron-LM's ``save_checkpoint`` stores an iteration-0 ("release") checkpoint."""
    return {**model_state, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}


def model_state_dict(model) -> dict:
    """Megatron-LM's model entries: ``model`` or ``model0``, ``model1``, … for virtual pipeline stages.

    The metadata names the data-parallel group, as Megatron-LM's checkpointing passes it: ``GPTModel`` reads it
    itself for the multi-token-prediction block's copy of the embedding on a later pipeline stage.
    """
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    chunks = unwrap_chunks(model)
    states = [chunk.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None)) for chunk in chunks]
    return {"model": states[0]} if len(states) == 1 else {f"model{i}": state for i, state in enumerate(states)}


def check_writer_dependencies() -> None:
    """Raise unless the packages dist_checkpointing's writer needs are installed."""
    # dist_checkpointing's writer processes import psutil; without it they die and the save hangs.
    if importlib.util.find_spec("psutil") is None:
        raise MegatronCheckpointError("saving a Megatron checkpoint needs the psutil package: pip install psutil")


def save_checkpoint(root: str | Path, state_dict: dict, iteration: int | None = None) -> Path:
    """Save ``state_dict`` (sharded entries from every rank) and point the tracker at it. All ranks call."""
    check_writer_dependencies()
    checkpoint_helpers_die_with_this_process()
    folder = iteration_dir(root, iteration)

    def claim_folder() -> None:
        check_save_keeps_history(root, iteration)
        folder.mkdir(parents=True, exist_ok=True)

    on_rank0(claim_folder, share=False)
    save_dist_checkpoint(state_dict, folder)
    dist.barrier()
    if dist.get_rank() == 0:
        write_tracker(root, iteration)
    dist.barrier()
    logger.info("saved Megatron checkpoint %s", folder)
    return folder


def check_global_shapes(needed: Iterable, saved: Mapping[str, Sequence[int]], root: str | Path) -> None:
    """Every ``ShardedTensor`` of ``needed`` is in ``saved`` (key → global shape) with its global shape.

    Raises before anything is read, naming the first tensor that is missing or shaped otherwise; a
    LoRA training checkpoint (adapters only, no base weights) is named as such.
    """
    for tensor in needed:
        found = saved.get(tensor.key)
        if found is None and saved and all(".lora.lora_" in key for key in saved):
            raise MegatronCheckpointError(
                f"{root} holds LoRA adapters only (a LoRA training run's; the base is the HF folder it trained on): "
                "export them with hfmb export --adapter (a PEFT adapter folder) or --merge (the base with them merged in)"
            )
        if found is None:
            raise MegatronCheckpointError(f"{root} has no tensor {tensor.key}, which the model of this config needs")
        if tuple(found) != tuple(tensor.global_shape):
            raise MegatronCheckpointError(
                f"{root}: tensor {tensor.key} is {list(found)}, the model of this config needs {list(tensor.global_shape)}"
            )


def check_save_keeps_history(root: str | Path, iteration: int | None) -> None:
    """Refuse a save that would destroy a checkpoint: a complete saved iteration, or a tracker naming a later one.

    Megatron-Core replaces such a folder with a warning; a rerun of a training command would then
    silently start over on top of the run before it. An incomplete folder (no ``metadata.json``, a
    save that died) may be replaced.
    """
    root = Path(root)
    folder = iteration_dir(root, iteration)
    what = "release" if iteration is None else f"iteration {iteration}"
    if (folder / "metadata.json").exists():
        raise MegatronCheckpointError(
            f"{root} already holds a complete checkpoint at {what} ({folder.name}): a save never replaces one; "
            "resume from it (--load) or save elsewhere"
        )
    if is_checkpoint(root) and iteration is not None:
        latest = latest_iteration(root)
        if latest is not None and latest > iteration:
            raise MegatronCheckpointError(
                f"{root} holds a checkpoint at iteration {latest}, later than the {what} being saved: "
                "resume from it (--load) or save elsewhere"
            )


class _PythonFileCommonSave(TorchCommonSaveStrategy):
    """Megatron's save of the common state (``common.pt``), through a Python file.

    ``torch.save`` to a path writes through a C++ stream that drops the errno, so a full disk became
    "unexpected pos 704 vs 598" or "iostream error"; through a Python file the OSError itself is raised.
    """

    def save_common(self, common_state_dict: dict, checkpoint_dir: str | Path) -> None:
        if dist.get_rank() == 0:
            with open(Path(checkpoint_dir) / COMMON_STATE_FNAME, "wb") as handle:
                torch.save(common_state_dict, handle)


def save_dist_checkpoint(state_dict: dict, folder: Path, sharded_strategy=None, needed: int | None = None) -> None:
    """``dist_checkpointing.save`` into ``folder``. All ranks call.

    A full disk raises ``DiskFullError`` (saying ``needed`` bytes when known).
    """
    # dist_checkpointing.save accepts no common strategy but its default: make this one the default.
    register_default_strategy(StrategyAction.SAVE_COMMON, "torch", 1, _PythonFileCommonSave("torch", 1))
    with disk_full_reported(folder, needed, partial=folder):
        dist_checkpointing.save(state_dict, str(folder), sharded_strategy=sharded_strategy)


def write_tracker(root: str | Path, iteration: int | None) -> None:
    """Point ``latest_checkpointed_iteration.txt`` at ``iteration`` (None: release), atomically (one rank calls)."""
    tmp = Path(root) / f".{TRACKER}.tmp"
    tmp.write_text("release" if iteration is None else str(iteration))
    os.replace(tmp, Path(root) / TRACKER)


def load_checkpoint(
    root: str | Path, state_dict: dict, iteration: int | None | str = "latest", strict: str = "assume_ok_unexpected"
) -> dict:
    """Load into the sharded ``state_dict`` (from ``model_state_dict`` plus the caller's entries). All ranks call."""
    _, folder = complete_iteration(root, iteration)
    return dist_checkpointing.load(state_dict, str(folder), strict=strict)


def load_model(root: str | Path, model, iteration: int | None | str = "latest") -> None:
    """Load just the model weights of a checkpoint into ``model`` (any TP/PP layout)."""
    chunks = unwrap_chunks(model)
    loaded = load_checkpoint(root, model_state_dict(chunks), iteration)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys):
        chunk.load_state_dict(loaded[key], strict=False)


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a Megatron-LM-layout checkpoint root (it has the tracker file)."""
    return (Path(path) / TRACKER).is_file()


def write_source_info(root: str | Path, hf_folder: str | Path, side_files: dict[str, Path | str], info: dict[str, Any]) -> None:
    """Copy the source's config and side files to ``root/hf_config`` and write ``root/bridge.json`` (one rank calls)."""
    root = Path(root)
    target = root / HF_CONFIG_DIR
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(hf_folder) / "config.json", target / "config.json")
    for name, source in side_files.items():
        if isinstance(source, str):
            (target / name).write_text(source)
        else:
            shutil.copyfile(source, target / name)
    (root / SOURCE_INFO).write_text(json.dumps({"format": SOURCE_INFO_FORMAT, **info}, indent=2, sort_keys=True) + "\n")


def read_source_info(root: str | Path) -> dict[str, Any]:
    """``bridge.json`` of a checkpoint made by ``hfmb import``; raises when the checkpoint has none."""
    root = Path(root)
    if not root.exists():
        raise MegatronCheckpointError(f"the checkpoint folder {root} does not exist")
    if not is_checkpoint(root):
        raise MegatronCheckpointError(f"{root} is not a Megatron checkpoint: no {TRACKER}")
    path = root / SOURCE_INFO
    if not path.is_file() or not (root / HF_CONFIG_DIR / "config.json").is_file():
        raise MegatronCheckpointError(
            f"{root} has no {SOURCE_INFO} / {HF_CONFIG_DIR}/config.json: it was not written by this tool, "
            "so the HF config it belongs to is unknown; name it with --hf-config DIR (hf_config= in Python)"
        )
    info = read_json(path, MegatronCheckpointError)
    if info.get("format") != SOURCE_INFO_FORMAT:
        raise MegatronCheckpointError(f"{path} has format {info.get('format')!r}; this version reads {SOURCE_INFO_FORMAT!r}")
    _check_source_info(path, info)
    return info


def _check_source_info(path: Path, info: dict[str, Any]) -> None:
    """Refuse values of ``bridge.json`` that the export would otherwise trip over with a message naming neither file nor key."""
    dtypes = info.get("hf_dtypes", {})
    if not isinstance(dtypes, dict):
        raise MegatronCheckpointError(f"{path}: hf_dtypes is {type(dtypes).__name__}; expected an object of HF tensor name → dtype")
    for key, value in [("params_dtype", info.get("params_dtype")), *((f"hf_dtypes[{json.dumps(name)}]", d) for name, d in dtypes.items())]:
        if dtype_named(value) is None:
            raise MegatronCheckpointError(
                f"{path}: {key} is {json.dumps(value)}, which is not a torch dtype (e.g. 'bfloat16', 'float16', 'float32')"
            )
    padded = info.get("padded_vocab_size")
    if type(padded) is not int or padded < 1:
        raise MegatronCheckpointError(f"{path}: padded_vocab_size is {json.dumps(padded)}; it must be a positive integer")


def hf_config_folder(root: str | Path) -> Path:
    return Path(root) / HF_CONFIG_DIR
