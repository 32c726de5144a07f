"""Writing an HF folder atomically: safetensors shards, their index, config and side files.

Everything goes into a temporary folder beside the target (same filesystem, so the final rename is
atomic); the side files, the index and config.json are written last, every file is fsynced, an
optional check runs on the finished temporary folder, and only then is it renamed into place. An
interrupted export (even a killed process) therefore leaves the target absent or, with
``overwrite``, untouched; a target is never a mix of old and new files, so there are no stale shards.

With ``overwrite`` the old folder is swapped out in one ``renameat2(RENAME_EXCHANGE)`` where the
platform has it (Linux), else moved aside and replaced (two renames). Temporary folders that a
killed export left behind are named after the host and process that made them and are removed by
the next export to the same target once that process is gone.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from bridge.hf_checkpoint import INDEX_NAME

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
# What an HF model folder (one we may replace with ``overwrite``) contains.
_MODEL_FOLDER_MARKERS = ("config.json", INDEX_NAME, "model.safetensors")


class OutputFolderError(ValueError):
    """The export target cannot be written (exists and is not empty, or is a file)."""


class ExportCheckError(ValueError):
    """A finished export is not what it claims to be (the target was left untouched)."""


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"`` or ``"500MiB"``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read the size {size!r}; write it like '5GB' or '500MB'")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value < 1:
        raise ValueError(f"the size {size!r} must be at least one byte")
    return value


def looks_like_model_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an HF model (config or weights): the only kind ``overwrite`` replaces."""
    return any((folder / name).exists() for name in _MODEL_FOLDER_MARKERS) or any(folder.glob("*.safetensors"))


def check_output_folder(out_dir: Path, overwrite: bool, replaceable: Callable[[Path], bool] = looks_like_model_folder) -> None:
    """Refuse a target that is a file, or a non-empty folder unless ``overwrite``.

    ``overwrite`` replaces only a folder ``replaceable`` recognises (an earlier export): a typo in the
    target must not delete an unrelated folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputFolderError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise OutputFolderError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        if not replaceable(out_dir):
            raise OutputFolderError(
                f"{out_dir} exists, is not empty and does not look like a folder this tool wrote; "
                "refusing to replace it even with overwrite — remove it yourself if that is what you want"
            )


def temp_folder_for(out_dir: Path) -> Path:
    """A fresh temporary folder name beside ``out_dir``, naming this host and process."""
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}.tmp-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_temp_folders(out_dir: Path) -> list[Path]:
    """Remove temporary folders of ``out_dir`` left by processes of this host that no longer run."""
    out_dir = Path(out_dir).absolute()
    pattern = re.compile(re.escape(f".{out_dir.name}.") + r"(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for path in out_dir.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match is None or match.group("host") != _host() or _alive(int(match.group("pid"))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        logger.warning("removed %s, left behind by an interrupted run (process %s)", path, match.group("pid"))
    return removed


def publish_folder(tmp_dir: Path, out_dir: Path) -> None:
    """Make ``tmp_dir``'s files durable and rename it to ``out_dir``; an existing ``out_dir`` is swapped out and deleted."""
    tmp_dir, out_dir = Path(tmp_dir), Path(out_dir)
    _fsync_files(tmp_dir)
    _fsync_dir(tmp_dir)
    if out_dir.exists():
        if _exchange(tmp_dir, out_dir):  # tmp_dir now holds the old folder
            old = tmp_dir
        else:
            old = out_dir.parent / f".{out_dir.name}.old-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(tmp_dir, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, out_dir)
    _fsync_dir(out_dir.parent)


class HFFolderWriter:
    """Streams (name, tensor) pairs into safetensors shards of at most ``max_shard_size`` bytes."""

    def __init__(self, out_dir: str | Path, *, max_shard_size: int | str = "5GB", overwrite: bool = False):
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        check_output_folder(self.out_dir, overwrite)
        self.max_shard_bytes = parse_size(max_shard_size)
        remove_stale_temp_folders(self.out_dir)
        self.tmp_dir = temp_folder_for(self.out_dir)
        self.tmp_dir.mkdir(parents=True)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._total_bytes = 0
        self._total_params = 0

    def __enter__(self) -> "HFFolderWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._shapes:
            raise ValueError(f"tensor {name} was written twice")
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a view into a larger buffer: safetensors refuses shared storage
        size = tensor.nbytes
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._shapes[name] = tuple(tensor.shape)
        self._pending_bytes += size
        self._total_bytes += size
        self._total_params += tensor.numel()

    def _flush(self) -> None:
        index = len(self._shards)
        path = self.tmp_dir / f"shard-{index}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~_umask())  # safetensors creates 0600 files: a server running as another user could not read them
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(
        self, config: dict, side_files: dict[str, Path | str] | None = None, check: Callable[[Path], None] | None = None
    ) -> Path:
        """Name the shards, write side files, the index and config.json last, run ``check``, move into place.

        ``check(folder)`` sees the finished folder before it is published; if it raises, the
        temporary folder is removed and the target is left as it was.
        """
        try:
            from bridge.export_metadata import check_weights_match_config

            check_weights_match_config(config, self._shapes)
            if self._pending or not self._shards:
                self._flush()
            count = len(self._shards)
            weight_map = {}
            for index, names in enumerate(self._shards):
                final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
                os.replace(self.tmp_dir / f"shard-{index}.tmp", self.tmp_dir / final)
                weight_map.update({name: final for name in names})
            for name, source in (side_files or {}).items():
                if isinstance(source, str):  # generated content
                    _write_text(self.tmp_dir / name, source)
                else:
                    shutil.copyfile(source, self.tmp_dir / name)
            index_doc = {
                "metadata": {"total_parameters": self._total_params, "total_size": self._total_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            }
            _write_text(self.tmp_dir / INDEX_NAME, json.dumps(index_doc, indent=2, sort_keys=True) + "\n")
            _write_text(self.tmp_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
            if check is not None:
                check(self.tmp_dir)
            publish_folder(self.tmp_dir, self.out_dir)
        except BaseException:
            self.abort()
            raise
        logger.info("wrote %d tensors in %d shards to %s", len(weight_map), count, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def _fsync_files(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the platform or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
