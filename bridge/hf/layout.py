"""The byte layout of an export's safetensors files, fixed before any data moves, so that several ranks can write one file.

An in-memory model's export knows the name, dtype and shape of every HF tensor up front (the
mappings run on meta tensors), so the files, their headers and each tensor's byte offset are
computed the same way on every rank before anything is written. Rank 0 creates the files (header
written, final size set); then each rank writes the bytes it holds at their offsets
(``LayoutWriter``): a tensor joined along dim 0 from TP shards (column-parallel, QKV, gate/up,
vocab) is written by the holders of its shards, each its own part, with nothing sent between them;
any other tensor by one rank. The data of every file starts on a 4 KiB boundary, so each rank's
``O_DIRECT`` writes cover whole blocks of its own bytes; a block shared by two ranks' parts goes
through the page cache (see ``DataAppender``).
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from bridge.hf.writer import (
    DIRECT_BLOCK,
    MAX_HEADER_BYTES,
    METADATA_ENTRY,
    DataAppender,
    WrittenShards,
    check_writable,
    header_entry,
    header_shape,
    round_up,
    safetensors_dtype,
    write_all,
)
from bridge.mappings import JoinedShards


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor's bytes go: file index, absolute offset of its first byte, and what it must be."""

    file: int
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass(frozen=True)
class LayoutFile:
    name: str  # temporary name, until the folder's writer numbers the files
    header: bytes  # the 8-byte header length, the header, spaces up to the first data byte
    size: int
    names: list[str]


class ShardLayout:
    """Files of at most ``max_shard_bytes`` data bytes holding ``tensors`` in the order given (shapes and dtypes suffice: meta tensors)."""

    def __init__(self, tensors: Sequence[tuple[str, torch.Tensor | JoinedShards]], max_shard_bytes: int):
        groups: list[list[tuple[str, torch.Tensor | JoinedShards]]] = [[]]
        data = 0
        for name, tensor in tensors:
            if groups[-1] and data + tensor.nbytes > max_shard_bytes:
                groups.append([])
                data = 0
            groups[-1].append((name, tensor))
            data += tensor.nbytes
        self.files: list[LayoutFile] = []
        self.slots: dict[str, TensorSlot] = {}
        for index, group in enumerate(groups):
            entries, begin = [METADATA_ENTRY], 0
            for name, tensor in group:
                entries.append(
                    header_entry(name, safetensors_dtype(name, tensor), header_shape(name, tensor), begin, begin + tensor.nbytes)
                )
                begin += tensor.nbytes
            header = ("{" + ",".join(entries) + "}").encode("ascii")
            length = round_up(8 + len(header), DIRECT_BLOCK) - 8  # data starts on a block boundary
            if length > MAX_HEADER_BYTES:
                raise ValueError(
                    f"a safetensors header of {length} bytes is over the {MAX_HEADER_BYTES} that safetensors reads; lower max_shard_size"
                )
            start = 8 + length
            for name, tensor in group:
                if name in self.slots:
                    raise ValueError(f"tensor {name} is exported twice")
                self.slots[name] = TensorSlot(index, start, tuple(tensor.shape), tensor.dtype, tensor.nbytes)
                start += tensor.nbytes
            padded = struct.pack("<Q", length) + header + b" " * (length - len(header))
            self.files.append(LayoutFile(f"layout-{index}.tmp", padded, start, [name for name, _ in group]))

    def create(self, folder: Path) -> None:
        """Create every file in ``folder`` with its header and its final size (the data still holes)."""
        for file in self.files:
            fd = os.open(Path(folder) / file.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                write_all(fd, memoryview(file.header), 0)
                os.ftruncate(fd, file.size)
            finally:
                os.close(fd)

    def check_written(self, written: Sequence[Mapping[int, int]]) -> None:
        """Refuse files whose data the writers' bytes (file index → bytes, one mapping per writer) do not add up to."""
        for index, file in enumerate(self.files):
            data = file.size - len(file.header)
            total = sum(counts.get(index, 0) for counts in written)
            if total != data:
                raise RuntimeError(f"{file.name}: the ranks wrote {total} bytes of its {data} data bytes; the export is incomplete")

    def written(self) -> WrittenShards:
        """The files as ``HFFolderWriter.finish`` takes them (it gives them their final names)."""
        shapes = {name: slot.shape for name, slot in self.slots.items()}
        return WrittenShards(
            files=[file.name for file in self.files],
            names=[list(file.names) for file in self.files],
            shapes=shapes,
            total_bytes=sum(slot.nbytes for slot in self.slots.values()),
            total_params=sum(slot.nbytes // slot.dtype.itemsize for slot in self.slots.values()),
        )


class LayoutWriter:
    """This rank's share of a ``ShardLayout``: the bytes it holds of each tensor it is given, at their offsets.

    ``add`` takes a whole tensor, or a ``JoinedShards`` whose parts held by other ranks are meta
    tensors (skipped: their holders write them). Files are opened at their first write; ``close``
    writes what is staged and fsyncs each file this rank wrote (on a cluster filesystem another
    client's fsync may not flush it).
    """

    def __init__(self, folder: Path, layout: ShardLayout):
        self.folder = Path(folder)
        self.layout = layout
        self._open: dict[int, tuple[int, DataAppender]] = {}
        self.written_bytes: dict[int, int] = {}  # file index → data bytes this writer wrote into it

    def add(self, name: str, tensor: torch.Tensor | JoinedShards) -> None:
        slot = self.layout.slots.get(name)
        if slot is None:
            raise ValueError(f"tensor {name} is not among the tensors the export planned")
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise ValueError(f"tensor {name} is {list(tensor.shape)} {tensor.dtype}; the export planned {list(slot.shape)} {slot.dtype}")
        if isinstance(tensor, JoinedShards) and tensor.dim == 0:
            pieces = tensor.parts  # consecutive byte ranges: each written where it goes, the meta ones by their holders
        elif isinstance(tensor, JoinedShards) and any(part.is_meta for part in tensor.parts):
            raise ValueError(f"tensor {name}: a join along dim {tensor.dim} cannot be written part by part; it needs every part")
        else:
            pieces = [tensor]
        offset = slot.offset
        for piece in pieces:
            if piece.nbytes and not (isinstance(piece, torch.Tensor) and piece.is_meta):
                self._appender(slot.file).append(check_writable(name, piece), offset)
                self.written_bytes[slot.file] = self.written_bytes.get(slot.file, 0) + piece.nbytes
            offset += piece.nbytes

    def close(self) -> None:
        try:
            self._finish_below(len(self.layout.files))
        finally:
            self.abort()

    def abort(self) -> None:
        """Close every file without finishing it (the folder's writer removes them)."""
        while self._open:
            _, (fd, appender) = self._open.popitem()
            with contextlib.suppress(Exception):
                appender.close()
            with contextlib.suppress(OSError):
                os.close(fd)

    def _finish_below(self, file: int) -> None:
        """Finish the open files numbered below ``file``: tensors come nearly in layout order, so they rarely get more.

        (A tensor written ahead of one still arriving may open the next file first; the earlier file
        is then opened again for the late tensor, and finished again.)"""
        for index in sorted(i for i in self._open if i < file):
            fd, appender = self._open.pop(index)
            try:
                appender.finish()
                os.fsync(fd)
            finally:
                os.close(fd)

    def _appender(self, file: int) -> DataAppender:
        if file not in self._open:
            self._finish_below(file)
            path = self.folder / self.layout.files[file].name
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                self._open[file] = (fd, DataAppender(path, fd))
            except BaseException:
                os.close(fd)
                raise
        return self._open[file][1]
