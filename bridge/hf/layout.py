"""The safetensors files of an export, laid out before any data moves: their headers and each tensor's offset.

An export knows the name, dtype and shape of every HF tensor before it has any value (the mappings
run on meta tensors), so the files, their headers and each tensor's byte offset are computed up
front, the same way on every rank. ``ShardLayout.create`` makes the files (header written, final
size set); ``LayoutWriter`` writes the bytes a writer holds at their offsets, so several writers
(ranks) can fill one file: a tensor joined along dim 0 from TP shards (column-parallel, QKV,
gate/up, vocab) is written by the holders of its shards, each its own part, with nothing sent
between them. Slices named ``stacked[i]`` (experts a family stores stacked) are planned as their one
stacked tensor and each written at its offset in it. The data of every file starts on a ``DIRECT_BLOCK`` boundary, so that each writer's
whole blocks can go through ``O_DIRECT`` (``DataAppender``).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from bridge.hf.data_appender import DIRECT_BLOCK, DataAppender, round_up, write_all
from bridge.hf.reader import SAFETENSORS_DTYPES
from bridge.mappings import JoinedShards
from bridge.mappings.hf_views import split_stacked_name

# torch dtype → safetensors dtype name, as ``safetensors.torch.save_file`` writes them.
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: label for label, dtype in SAFETENSORS_DTYPES.items()}
# The header size safetensors refuses to read beyond (its MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
# The first entry of every header, as safetensors writes it.
_METADATA_ENTRY = '"__metadata__":' + json.dumps({"format": "pt"}, separators=(",", ":"))


def safetensors_dtype(name: str, tensor: torch.Tensor | JoinedShards) -> str:
    """The safetensors name of ``tensor``'s dtype; refuses (naming the tensor) a dtype safetensors has no name for."""
    try:
        return _DTYPE_NAMES[tensor.dtype]
    except KeyError:
        supported = ", ".join(str(dtype).removeprefix("torch.") for dtype in _DTYPE_NAMES)
        raise ValueError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot store (it stores {supported})") from None


def header_shape(name: str, tensor: torch.Tensor | JoinedShards) -> list[int]:
    """The shape safetensors records: its F4 counts 4-bit values, two per ``float4_e2m1fn_x2`` element."""
    shape = list(tensor.shape)
    if _DTYPE_NAMES.get(tensor.dtype) == "F4":
        if not shape:
            raise ValueError(f"tensor {name} is a 0-d float4_e2m1fn_x2 tensor, which has no safetensors shape")
        shape[-1] *= 2
    return shape


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


def _header(group: Sequence[tuple[str, torch.Tensor | JoinedShards]]) -> bytes:
    """The 8-byte length and the JSON header of a file holding ``group`` in order, padded with spaces to a block boundary."""
    entries, begin = [_METADATA_ENTRY], 0
    for name, tensor in group:
        info = {
            "dtype": safetensors_dtype(name, tensor),
            "shape": header_shape(name, tensor),
            "data_offsets": [begin, begin + tensor.nbytes],
        }
        entries.append(json.dumps(name) + ":" + json.dumps(info, separators=(",", ":")))
        begin += tensor.nbytes
    header = ("{" + ",".join(entries) + "}").encode("ascii")
    length = round_up(8 + len(header), DIRECT_BLOCK) - 8  # the format allows trailing spaces
    if length > MAX_HEADER_BYTES:
        raise ValueError(
            f"a safetensors header of {length} bytes is over the {MAX_HEADER_BYTES} that safetensors reads; lower max_shard_size"
        )
    return struct.pack("<Q", length) + header + b" " * (length - len(header))


def _stack_slices(
    tensors: Sequence[tuple[str, torch.Tensor | JoinedShards]],
) -> tuple[list[tuple[str, torch.Tensor | JoinedShards]], dict[str, tuple[str, int]]]:
    """``tensors`` with the slices named ``stacked[i]`` (``bridge.mappings.hf_views.stacked_experts``) replaced by
    their stacked tensor (a meta tensor, where its first slice was), and each slice's (stacked name, index).

    Refuses slices that do not make a whole tensor: an index missing or given twice, shapes or dtypes that differ.
    """
    slices: dict[str, dict[int, torch.Tensor | JoinedShards]] = {}
    where: dict[str, tuple[str, int]] = {}
    order: list[tuple[str, torch.Tensor | JoinedShards | None]] = []
    for name, tensor in tensors:
        split = split_stacked_name(name)
        if split is None:
            order.append((name, tensor))
            continue
        stacked, index = split
        if stacked not in slices:
            slices[stacked] = {}
            order.append((stacked, None))
        if index in slices[stacked]:
            raise ValueError(f"tensor {name} is exported twice")
        slices[stacked][index] = tensor
        where[name] = split
    out = []
    for name, tensor in order:
        if tensor is None:
            parts = slices[name]
            first = parts[min(parts)]
            if sorted(parts) != list(range(len(parts))):
                raise ValueError(f"tensor {name}: the export has slices {sorted(parts)} of it, not 0 to {len(parts) - 1}")
            odd = next((i for i, part in parts.items() if part.shape != first.shape or part.dtype != first.dtype), None)
            if odd is not None:
                odd_part = parts[odd]
                raise ValueError(
                    f"tensor {name}: slice {odd} is {list(odd_part.shape)} {odd_part.dtype}, slice 0 {list(first.shape)} {first.dtype}"
                )
            tensor = torch.empty((len(parts), *first.shape), dtype=first.dtype, device="meta")
        out.append((name, tensor))
    return out, where


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
    """Files of at most ``max_shard_bytes`` data bytes holding ``tensors`` in the order given; a larger tensor has a file to itself.

    Shapes and dtypes suffice (meta tensors). A file is closed only when the next tensor would not
    fit it. Refuses a name given twice, a dtype safetensors cannot store and a header larger than
    safetensors reads.
    """

    def __init__(self, tensors: Sequence[tuple[str, torch.Tensor | JoinedShards]], max_shard_bytes: int):
        tensors, self.stacked_slices = _stack_slices(tensors)
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
            header = _header(group)
            start = len(header)
            for name, tensor in group:
                if name in self.slots:
                    raise ValueError(f"tensor {name} is exported twice")
                self.slots[name] = TensorSlot(index, start, tuple(tensor.shape), tensor.dtype, tensor.nbytes)
                start += tensor.nbytes
            self.files.append(LayoutFile(f"shard-{index}.tmp", header, start, [name for name, _ in group]))

    @property
    def data_bytes(self) -> int:
        """The tensors' bytes (the index's ``total_size``)."""
        return sum(slot.nbytes for slot in self.slots.values())

    @property
    def file_bytes(self) -> int:
        """The files' bytes on disk, headers included."""
        return sum(file.size for file in self.files)

    @property
    def parameters(self) -> int:
        return sum(slot.nbytes // slot.dtype.itemsize for slot in self.slots.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: slot.shape for name, slot in self.slots.items()}

    def create(self, folder: Path) -> None:
        """Create every file in ``folder`` with its header and its final size (the data still holes)."""
        for file in self.files:
            # 0666 & ~umask, like any file a process creates (safetensors itself creates 0600 files).
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
                raise RuntimeError(f"{file.name}: the writers wrote {total} bytes of its {data} data bytes; the export is incomplete")


class LayoutWriter:
    """One writer's share of a ``ShardLayout``: the bytes it holds of each tensor it is given, at their offsets.

    ``add`` takes a whole tensor, or a ``JoinedShards`` whose parts held by other writers are meta
    tensors (skipped: their holders write them), and writes it before returning (through at most two
    staging buffers, never a copy of the tensor). Files are opened at their first write; ``close``
    writes what is staged and fsyncs each file this writer wrote (on a cluster filesystem another
    client's fsync may not flush it).
    """

    def __init__(self, folder: Path, layout: ShardLayout):
        self.folder = Path(folder)
        self.layout = layout
        self._open: dict[int, tuple[int, DataAppender]] = {}
        self._added: set[str] = set()
        self.written_bytes: dict[int, int] = {}  # file index → data bytes this writer wrote into it

    def add(self, name: str, tensor: torch.Tensor | JoinedShards) -> None:
        """Write ``tensor``, or, for a name ``stacked[i]``, slice ``i`` of the stacked tensor, at its offset."""
        stacked, index = self.layout.stacked_slices.get(name, (name, None))
        slot = self.layout.slots.get(stacked)
        if slot is None:
            raise ValueError(f"tensor {name} is not among the tensors the export planned")
        if name in self._added:
            raise ValueError(f"tensor {name} was written twice")
        shape, offset = slot.shape, slot.offset
        if index is not None:
            shape = slot.shape[1:]
            offset += index * (slot.nbytes // slot.shape[0])
        if tuple(tensor.shape) != shape or tensor.dtype != slot.dtype:
            raise ValueError(f"tensor {name} is {list(tensor.shape)} {tensor.dtype}; the export planned {list(shape)} {slot.dtype}")
        if isinstance(tensor, JoinedShards) and tensor.dim == 0:
            pieces = tensor.parts  # consecutive byte ranges: each written where it goes, the meta ones by their holders
        elif isinstance(tensor, JoinedShards) and any(part.is_meta for part in tensor.parts):
            raise ValueError(f"tensor {name}: a join along dim {tensor.dim} cannot be written part by part; it needs every part")
        else:
            pieces = [tensor]
        self._added.add(name)
        for piece in pieces:
            if piece.nbytes and not (isinstance(piece, torch.Tensor) and piece.is_meta):
                self._appender(slot.file).append(check_writable(name, piece), offset)
                self.written_bytes[slot.file] = self.written_bytes.get(slot.file, 0) + piece.nbytes
            offset += piece.nbytes

    def close(self) -> None:
        """Write what is staged and fsync the files this writer wrote; closing again does nothing."""
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
