"""Writing an HF folder atomically: safetensors shards, their index, config and side files.

Everything goes into a temporary folder beside the target (same filesystem, so the final rename is
atomic); the side files, the index and config.json are written last, every file is fsynced, an
optional check runs on the finished temporary folder, and only then is it moved into place. An
interrupted export (even a killed process) therefore leaves the target absent or, with
``overwrite``, untouched; a target is never a mix of old and new files, so there are no stale shards.
What a target may be, what ``overwrite`` may replace and how the result is published without
replacing anything unchecked is ``bridge.hf.output_folder``'s.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import re
import shutil
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from bridge.hf.output_folder import HF_MODEL_FOLDER, claimed_target
from bridge.hf.reader import INDEX_NAME, SAFETENSORS_DTYPES
from bridge.mappings import JoinedShards, copy_bytes

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


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


@dataclass
class WrittenShards:
    """What one ``ShardSequenceWriter`` wrote: its closed shard files (temporary names) and their tensors."""

    files: list[str] = field(default_factory=list)
    names: list[list[str]] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    total_bytes: int = 0
    total_params: int = 0


class ShardSequenceWriter:
    """Streams (name, tensor) pairs into safetensors shards of at most ``max_shard_bytes`` data bytes.

    Each tensor's bytes go to the current shard file as soon as ``add`` receives it, straight from
    the tensor's memory (no ``bytes`` copy, no shard buffer), so memory stays at one tensor. A
    safetensors file starts with its header, which is only known once the shard is complete: every
    shard therefore starts with a reserved header region, filled at the end with the exact header
    padded with spaces (the format allows trailing whitespace, and safetensors itself pads to keep
    the data 8-byte aligned). A tensor whose header entry would not fit the reservation starts a new
    shard, and later shards reserve twice as much. Files are named ``shard-{i}.tmp`` until the
    folder's writer gives them their final names.
    """

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._reserve = initial_header_reservation(max_shard_bytes)
        self._shard: _ShardFile | None = None
        self.written = WrittenShards()

    def add(self, name: str, tensor: torch.Tensor | JoinedShards) -> None:
        """Write ``tensor`` to the current shard now (starting a new shard when it would not fit).

        A ``JoinedShards`` is written part by part, never joined in memory.
        """
        if name in self.written.shapes:
            raise ValueError(f"tensor {name} was written twice")
        dtype = safetensors_dtype(name, tensor)
        tensor = check_writable(name, tensor)
        shape = header_shape(name, tensor)
        size = tensor.nbytes
        shard = self._shard
        if shard is not None and shard.names:
            if shard.data_bytes + size > self.max_shard_bytes:
                self._close_shard()
            elif not shard.fits(name, dtype, shape, size):
                self._close_shard()
                self._reserve = min(2 * self._reserve, MAX_HEADER_BYTES)
                logger.debug("shard header outgrew its %d-byte reservation; later shards reserve %d", shard.reserve, self._reserve)
        if self._shard is None:
            self._open_shard()
        self._shard.write(name, dtype, shape, tensor)
        self.written.shapes[name] = tuple(tensor.shape)
        self.written.total_bytes += size
        self.written.total_params += tensor.numel()

    def close(self, keep_empty: bool = False) -> WrittenShards:
        """Close the open shard; with ``keep_empty``, a writer that wrote nothing still leaves one empty shard."""
        if self._shard is not None or (keep_empty and not self.written.files):
            self._close_shard()
        return self.written

    def abort(self) -> None:
        """Close the open shard without finishing it (the folder's writer removes the files)."""
        if self._shard is not None:
            with contextlib.suppress(OSError):
                self._shard.discard()
            self._shard = None

    def _open_shard(self) -> None:
        path = self.folder / f"shard-{len(self.written.files)}.tmp"
        self._shard = _ShardFile(path, self._reserve)

    def _close_shard(self) -> None:
        if self._shard is None:
            self._open_shard()
        shard, self._shard = self._shard, None
        shard.close()
        self.written.files.append(shard.path.name)
        self.written.names.append(shard.names)


class HFFolderWriter:
    """Writes an HF folder: shards streamed by ``add`` (or written into ``tmp_dir`` by other writers), then its index and config.

    Everything is written into ``tmp_dir`` and moved into place by ``finish`` (see the module's
    docstring); other ranks that see the same filesystem may write their own shards into
    ``tmp_dir`` and hand what they wrote to ``finish``.
    """

    def __init__(self, out_dir: str | Path, *, max_shard_size: int | str = "5GB", overwrite: bool = False):
        self.max_shard_bytes = parse_size(max_shard_size)
        self._claim = contextlib.ExitStack()
        self._target = self._claim.enter_context(claimed_target(out_dir, overwrite=overwrite, kind=HF_MODEL_FOLDER))
        self.out_dir = self._target.path
        self.tmp_dir = self._target.temp_path()
        try:
            self.tmp_dir.mkdir()
        except BaseException:
            self._claim.close()
            raise
        self._shards = ShardSequenceWriter(self.tmp_dir, self.max_shard_bytes)

    def __enter__(self) -> "HFFolderWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, name: str, tensor: torch.Tensor | JoinedShards) -> None:
        """Write ``tensor`` to the current shard now (starting a new shard when it would not fit)."""
        self._shards.add(name, tensor)

    def finish(
        self,
        config: dict,
        side_files: dict[str, Path | str] | None = None,
        check: Callable[[Path], None] | None = None,
        others: Sequence[WrittenShards] = (),
    ) -> Path:
        """Name the shards, write side files, the index and config.json last, run ``check``, move into place.

        ``others`` are the shards other writers put in ``tmp_dir``; they are numbered after this
        writer's, in the order given. ``check(folder)`` sees the finished folder before it is
        published; if it raises, the temporary folder is removed and the target is left as it was.
        """
        try:
            from bridge.hf.metadata import check_weights_match_config

            parts = [self._shards.close(keep_empty=not any(other.files for other in others)), *others]
            shapes: dict[str, tuple[int, ...]] = {}
            for part in parts:
                twice = sorted(set(shapes) & set(part.shapes))
                if twice:
                    raise ValueError(f"tensors written twice: {', '.join(twice[:10])}")
                shapes.update(part.shapes)
            check_weights_match_config(config, shapes)
            files = [(file, names) for part in parts for file, names in zip(part.files, part.names)]
            weight_map = {}
            for index, (file, names) in enumerate(files):
                final = f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
                os.replace(self.tmp_dir / file, self.tmp_dir / final)
                weight_map.update({name: final for name in names})
            for name, source in (side_files or {}).items():
                if isinstance(source, str):  # generated content
                    _write_text(self.tmp_dir / name, source)
                else:
                    shutil.copyfile(source, self.tmp_dir / name)
            index_doc = {
                "metadata": {"total_parameters": sum(p.total_params for p in parts), "total_size": sum(p.total_bytes for p in parts)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            _write_text(self.tmp_dir / INDEX_NAME, json.dumps(index_doc, indent=2, sort_keys=True) + "\n")
            _write_text(self.tmp_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
            if check is not None:
                check(self.tmp_dir)
            self._target.publish(self.tmp_dir)
        except BaseException:
            self.abort()
            raise
        self._claim.close()
        logger.info("wrote %d tensors in %d shards to %s", len(weight_map), len(files), self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written so far: close the open shard and remove the temporary folder."""
        self._shards.abort()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._claim.close()


# torch dtype → safetensors dtype name, as ``safetensors.torch.save_file`` writes them.
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: label for label, dtype in SAFETENSORS_DTYPES.items()}
# The header size safetensors refuses to read beyond (its MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
_MIN_RESERVE, _MAX_INITIAL_RESERVE = 4 * 2**10, 2**20
_METADATA_JSON = json.dumps({"format": "pt"}, separators=(",", ":"))
METADATA_ENTRY = f'"__metadata__":{_METADATA_JSON}'  # the first entry of every header, as safetensors writes it
_WRITE_CHUNK = 1 << 30  # below Linux's 2 GiB limit on one write()
DIRECT_BLOCK = 4096  # O_DIRECT alignment of memory, offsets and lengths (a multiple of any device's logical block)
STAGE_BYTES = 8 * 2**20  # the staging buffer of O_DIRECT writes


def safetensors_dtype(name: str, tensor: torch.Tensor) -> str:
    """The safetensors name of ``tensor``'s dtype; refuses (naming the tensor) a dtype safetensors has no name for."""
    try:
        return _DTYPE_NAMES[tensor.dtype]
    except KeyError:
        supported = ", ".join(str(dtype).removeprefix("torch.") for dtype in _DTYPE_NAMES)
        raise ValueError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot store (it stores {supported})") from None


def header_entry(name: str, dtype: str, shape: list[int], begin: int, end: int) -> str:
    """One tensor's entry of a safetensors header (``begin``, ``end``: its data offsets)."""
    info = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    return json.dumps(name) + ":" + json.dumps(info, separators=(",", ":"))


def initial_header_reservation(max_shard_bytes: int) -> int:
    """Header bytes reserved at the start of each shard: 1/1024 of the shard size, 4 KiB to 1 MiB.

    1 MiB holds ~8,000 tensor entries (a 5GB shard of an MoE model with 3 MB experts needs ~1,700);
    the reservation doubles whenever a shard's header outgrows it.
    """
    return round_up(min(max(max_shard_bytes // 1024, _MIN_RESERVE), _MAX_INITIAL_RESERVE), 8)


class DataAppender:
    """Writes a file's data in runs (each run's bytes in order; a run starts wherever the caller says).

    ``O_DIRECT`` is used where the filesystem allows it.

    Buffered writes of fresh data have to find a fresh page-cache page for every 4 KiB, which was
    the whole cost of an export on the project's VMs (1.7 GB: 3.3 s buffered, 0.9 s direct, and the
    final fsync has nothing left to flush). ``O_DIRECT`` wants aligned memory, offsets and lengths,
    so the bytes go through page-aligned staging buffers and the whole blocks of a run are written
    direct; a run's first and last blocks, where the run covers them only in part, go through the
    buffered descriptor. So bytes around a run (a header written later, or another rank's part of
    the same file) are never overwritten by padding. There are two stages: a background thread
    writes a full one (``pwrite`` releases the GIL) while the caller fills the other. Where
    ``O_DIRECT`` is missing or refused (tmpfs, some network and FUSE filesystems, non-Linux), the
    same bytes go through the buffered descriptor.
    """

    def __init__(self, path: Path, buffered_fd: int, start: int = 0):
        self._buffered_fd = buffered_fd
        self._direct_fd: int | None = None
        if hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                self._direct_fd = None
        self._stages = [mmap.mmap(-1, STAGE_BYTES) for _ in range(2)]  # page-aligned, as O_DIRECT needs
        self._views = [memoryview(stage) for stage in self._stages]
        self._bytes = [torch.frombuffer(stage, dtype=torch.uint8) for stage in self._stages]  # the same memory, to copy tensors into
        self._writing: list[Future | None] = [None, None]  # each stage's write in flight
        self._current = 0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._start_run(start)

    @property
    def direct(self) -> bool:
        return self._direct_fd is not None

    def append(self, data: torch.Tensor | JoinedShards, offset: int | None = None) -> None:
        """Write the bytes of ``data`` at ``offset``, or right after the bytes written last; an offset elsewhere starts a new run.

        The bytes are copied from the tensor (or the parts of a ``JoinedShards``) straight into the
        stages (``copy_bytes``); ``check_writable`` says what can be given.
        """
        if offset is not None and offset != self._offset + self._fill:
            self._submit()
            self._start_run(offset)
        done, total = 0, data.nbytes
        while done < total:
            count = min(total - done, STAGE_BYTES - self._fill)
            copy_bytes(data, self._bytes[self._current][self._fill : self._fill + count], done)
            self._fill += count
            done += count
            if self._fill == STAGE_BYTES:
                self._submit()
                self._start_run(self._offset + STAGE_BYTES)

    def finish(self) -> None:
        """Write what the stages hold and close."""
        try:
            self._submit()
            for index in range(2):
                self._wait(index)
        finally:
            self.close()

    def close(self) -> None:
        for index in range(2):
            with contextlib.suppress(Exception):  # on an error path only: finish() has waited already
                self._wait(index)
        self._writer.shutdown(wait=True)
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
        self._bytes = []
        for view, stage in zip(self._views, self._stages):
            with contextlib.suppress(BufferError):  # a failed write's traceback may still hold a slice; GC frees it
                view.release()
                stage.close()

    def _start_run(self, offset: int) -> None:
        self._offset = offset - offset % DIRECT_BLOCK  # file offset of the current stage's first byte
        self._first = self._fill = offset - self._offset  # the stage's bytes in [first, fill) are the run's

    def _submit(self) -> None:
        """Hand the current stage's bytes to the background writer and move to the other stage once it is free."""
        if self._fill > self._first:
            view = self._views[self._current]
            self._writing[self._current] = self._writer.submit(self._write, view, self._first, self._fill, self._offset)
            self._current ^= 1
            self._wait(self._current)  # the next stage's previous write must be done before it is refilled

    def _wait(self, index: int) -> None:
        """Wait for stage ``index``'s write (raising its error)."""
        future, self._writing[index] = self._writing[index], None
        if future is not None:
            future.result()

    def _write(self, view: memoryview, first: int, end: int, offset: int) -> None:
        """Write a stage's bytes ``[first, end)`` at ``offset + first``: whole blocks direct, partial ones buffered."""
        head = min(round_up(first, DIRECT_BLOCK), end) if self.direct else end
        tail = max(head, end - end % DIRECT_BLOCK)
        if head > first:
            write_all(self._buffered_fd, view[first:head], offset + first)
        if tail > head:
            try:
                write_all(self._direct_fd, view[head:tail], offset + head)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                logger.info("O_DIRECT writes refused here (%s); writing through the page cache", err)
                os.close(self._direct_fd)
                self._direct_fd = None
                write_all(self._buffered_fd, view[head:tail], offset + head)
        if end > tail:
            write_all(self._buffered_fd, view[tail:end], offset + tail)


def write_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        written = os.pwrite(fd, data[done : done + _WRITE_CHUNK], offset + done)
        if written <= 0:
            raise OSError(errno.EIO, f"short write at offset {offset + done}")
        done += written


class _ShardFile:
    """One safetensors file being written: a reserved header region, then tensor data appended as it comes."""

    def __init__(self, path: Path, reserve: int):
        self.path = path
        self.reserve = reserve
        self.names: list[str] = []
        self.data_bytes = 0
        self._entries: list[str] = [METADATA_ENTRY]
        self._header_bytes = len(self._entries[0]) + 2  # the braces
        # 0666 & ~umask, like any file a process creates (safetensors itself creates 0600 files).
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        self._data: DataAppender | None = None  # opened with the first data byte, once the reservation is final

    def _entry(self, name: str, dtype: str, shape: list[int], size: int) -> str:
        return header_entry(name, dtype, shape, self.data_bytes, self.data_bytes + size)

    def fits(self, name: str, dtype: str, shape: list[int], size: int) -> bool:
        """Whether the header entry of this tensor still fits the reservation."""
        return self._header_bytes + 1 + len(self._entry(name, dtype, shape, size)) <= self.reserve

    def write(self, name: str, dtype: str, shape: list[int], tensor: torch.Tensor | JoinedShards) -> None:
        """Append the tensor's bytes to the file, straight from its memory (part by part), and record its header entry."""
        size = tensor.nbytes
        entry = self._entry(name, dtype, shape, size)
        needed = self._header_bytes + 1 + len(entry)
        if needed > self.reserve:  # only for a shard's first tensor (with a name of ~1/10 of the reservation)
            self._grow_reservation(needed)
        if size:
            if self._data is None:
                self._data = DataAppender(self.path, self._fd, 8 + self.reserve)
            self._data.append(tensor)  # checked by ShardSequenceWriter.add
        self._entries.append(entry)
        self._header_bytes = needed
        self.names.append(name)
        self.data_bytes += size

    def _grow_reservation(self, needed: int) -> None:
        if self.data_bytes:
            raise RuntimeError(f"{self.path}: the header cannot grow once data follows it (the writer checks fits() first)")
        if needed > MAX_HEADER_BYTES:
            raise ValueError(f"a safetensors header of {needed} bytes is over the {MAX_HEADER_BYTES} that safetensors reads")
        self.reserve = round_up(needed, 8)

    def close(self) -> None:
        """Write the header, padded with spaces to the reservation so the data starts where it was written."""
        header = ("{" + ",".join(self._entries) + "}").encode("ascii")
        header += b" " * (self.reserve - len(header))
        try:
            if self._data is not None:
                self._data.finish()
                self._data = None
            write_all(self._fd, memoryview(struct.pack("<Q", self.reserve) + header), 0)
            os.fsync(self._fd)  # by the writing process: on a cluster filesystem another client's fsync may not flush it
        finally:
            os.close(self._fd)

    def discard(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None
        os.close(self._fd)


def check_writable(name: str, tensor: torch.Tensor | JoinedShards) -> torch.Tensor | JoinedShards:
    """``tensor`` (each part of a ``JoinedShards``) with its values resolved, as ``DataAppender.append`` takes it.

    Refuses what safetensors cannot store (sparse layouts) and what has no values (meta tensors);
    conjugate and negative bits are applied, so the bytes in memory are the values. Device tensors
    stay where they are: the appender copies them to the host a stage at a time.
    """
    if isinstance(tensor, JoinedShards):
        return JoinedShards([check_writable(name, part) for part in tensor.parts], tensor.dim)
    if tensor.layout != torch.strided:
        raise ValueError(f"tensor {name} is {tensor.layout}; safetensors stores dense (strided) tensors only")
    if tensor.is_meta:
        raise ValueError(f"tensor {name} is on the meta device and has no values to write")
    return tensor.detach().resolve_conj().resolve_neg()


def header_shape(name: str, tensor: torch.Tensor) -> list[int]:
    """The shape safetensors records: its F4 counts 4-bit values, two per ``float4_e2m1fn_x2`` element."""
    shape = list(tensor.shape)
    if _DTYPE_NAMES.get(tensor.dtype) == "F4":
        if not shape:
            raise ValueError(f"tensor {name} is a 0-d float4_e2m1fn_x2 tensor, which has no safetensors shape")
        shape[-1] *= 2
    return shape


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
