"""Writing an HF folder atomically: safetensors shards, their index, config and side files.

Everything goes into a temporary folder beside the target; the index and config are written last and
the folder is renamed into place at the end, so an interrupted export leaves the target absent (or,
with ``overwrite``, untouched). Shards are cut by the project itself at ``max_shard_size``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from bridge.hf_checkpoint import INDEX_NAME

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class OutputFolderError(ValueError):
    """The export target cannot be written (exists and is not empty, or is a file)."""


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"`` or ``"500MiB"``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read the size {size!r}; write it like '5GB' or '500MB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def check_output_folder(out_dir: Path, overwrite: bool) -> None:
    """Refuse a target that is a file, or a non-empty folder unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputFolderError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputFolderError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")


class HFFolderWriter:
    """Streams (name, tensor) pairs into safetensors shards of at most ``max_shard_size`` bytes."""

    def __init__(self, out_dir: str | Path, *, max_shard_size: int | str = "5GB", overwrite: bool = False):
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        check_output_folder(self.out_dir, overwrite)
        self.max_shard_bytes = parse_size(max_shard_size)
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp_dir.mkdir(parents=True)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0
        self._total_params = 0

    def __enter__(self) -> "HFFolderWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in shard for shard in self._shards):
            raise ValueError(f"tensor {name} was written twice")
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a view into a larger buffer: safetensors refuses shared storage
        size = tensor.nbytes
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self._total_bytes += size
        self._total_params += tensor.numel()

    def _flush(self) -> None:
        index = len(self._shards)
        save_file(self._pending, str(self.tmp_dir / f"shard-{index}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self, config: dict, side_files: dict[str, Path] | None = None) -> Path:
        """Name the shards, write side files, the index and config.json last, and move into place."""
        if self._pending:
            self._flush()
        count = len(self._shards)
        weight_map = {}
        for index, names in enumerate(self._shards):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.tmp_dir / f"shard-{index}.tmp", self.tmp_dir / final)
            weight_map.update({name: final for name in names})
        for name, source in (side_files or {}).items():
            shutil.copyfile(source, self.tmp_dir / name)
        index_doc = {
            "metadata": {"total_parameters": self._total_params, "total_size": self._total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.tmp_dir / INDEX_NAME).write_text(json.dumps(index_doc, indent=2, sort_keys=True) + "\n")
        (self.tmp_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _fsync_folder(self.tmp_dir)
        self._move_into_place()
        logger.info("wrote %d tensors in %d shards to %s", len(weight_map), count, self.out_dir)
        return self.out_dir

    def _move_into_place(self) -> None:
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out_dir, old)
        os.replace(self.tmp_dir, self.out_dir)
        if old is not None:
            shutil.rmtree(old)

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
