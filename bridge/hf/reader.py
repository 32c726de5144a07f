"""Reading an HF checkpoint's safetensors tensors, lazily (the folder and its config: ``bridge.hf.folder``).

A tensor is read only when a mapping narrows it, so a rank that needs one TP slice reads just that
slice, through a memory map of a bounded window of its file (never the whole file), so that a shard
larger than the machine's memory or address space can be read and the pages read stay out of the
resident memory.
"""

from __future__ import annotations

import json
import logging
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from bridge.hf.folder import CheckpointError, weight_files

logger = logging.getLogger(__name__)

# safetensors dtype name → torch dtype, as ``safetensors.torch`` names them (the writer uses it inverted).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    label: dtype
    for label, attr in (
        ("F64", "float64"),
        ("F32", "float32"),
        ("F16", "float16"),
        ("BF16", "bfloat16"),
        ("I64", "int64"),
        ("I32", "int32"),
        ("I16", "int16"),
        ("I8", "int8"),
        ("U64", "uint64"),
        ("U32", "uint32"),
        ("U16", "uint16"),
        ("U8", "uint8"),
        ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
        ("F8_E5M2", "float8_e5m2"),
        ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
        ("F8_E8M0", "float8_e8m0fnu"),
        ("F4", "float4_e2m1fn_x2"),
        ("C64", "complex64"),
    )
    if (dtype := getattr(torch, attr, None)) is not None
}
# Names the reader refuses: F4's recorded shape counts 4-bit values, not torch elements.
_UNREADABLE = frozenset({"F4"})
# Least bytes of a file mapped at once (see ``SafetensorsReader``), so that small models map rarely.
MIN_REOPEN_BYTES = 64 * 2**20
# Memory that parsing a safetensors header takes per header byte (the JSON parse, then the reader's
# object for each tensor), which the streaming import counts against its budget.
HEADER_MEMORY_FACTOR = 10
# The longest header safetensors itself accepts (its MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
# A header longer than this and than the tensor data it describes is refused unparsed: in a real
# checkpoint every entry (~100 bytes) describes a weight of kilobytes at least.
PLAUSIBLE_HEADER_BYTES = 2**20


def header_bytes(path: Path) -> int:
    """The length of a safetensors file's JSON header, from its first 8 bytes (0 for a file too short to have one)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
    return int.from_bytes(prefix, "little") if len(prefix) == 8 else 0


def check_header(path: Path) -> None:
    """Refuse, before parsing it, a header longer than ``PLAUSIBLE_HEADER_BYTES`` and than the tensor data it describes.

    Parsing takes about ``HEADER_MEMORY_FACTOR`` times the header's length in memory.
    """
    size = header_bytes(path)
    data = path.stat().st_size - 8 - size
    if size > PLAUSIBLE_HEADER_BYTES and size > data >= 0:
        raise CheckpointError(
            f"{path}: its safetensors header is {size:,} bytes for {data:,} bytes of tensor data; refusing to parse it "
            f"(it would take about {HEADER_MEMORY_FACTOR * size / 2**20:,.0f} MiB of memory). "
            "A checkpoint's header is a small part of its file"
        )


class LazyTensor:
    """One tensor of a safetensors file; ``narrow`` reads only the slice asked for.

    It reads through its reader (not a file handle of its own), so it stays valid when the reader
    maps another window of its file, and holding it does not keep a released mapping alive.
    Slotted, since a header of a million entries makes a million of them.
    """

    __slots__ = ("_reader", "dtype", "name", "offset", "path", "shape")

    def __init__(self, name: str, path: Path, shape: torch.Size, dtype: torch.dtype, reader: SafetensorsReader, offset: int):
        self.name = name
        self.path = path
        self.shape = shape
        self.dtype = dtype
        self.offset = offset  # of its first byte in the file
        self._reader = reader

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if start < 0 or start + length > self.shape[dim]:
            raise CheckpointError(
                f"{self.name} in {self.path.name}: slice [{start}:{start + length}] of dim {dim} is outside its shape {list(self.shape)}"
            )
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._reader.read(self, index)

    def select_slice(self, index: tuple[slice, ...]) -> torch.Tensor:
        """A multi-dimensional slice, read from disk."""
        return self._reader.read(self, index)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor on disk."""
        return self.shape.numel() * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"LazyTensor({self.name}, {list(self.shape)}, {self.dtype})"


@dataclass(frozen=True)
class _SliceLayout:
    """Where ``shape[index]`` of a row-major tensor lies: sizes and strides (in elements), and its bytes."""

    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    first: int  # byte of its first element, from the tensor's start
    span: int  # bytes from its first element to the end of its last: the pages reading it touches; 0 when empty


def _slice_layout(shape: torch.Size, itemsize: int, index: tuple[slice, ...]) -> _SliceLayout:
    sizes, strides = [], []
    first = last = 0
    stride = 1
    for dim in reversed(range(len(shape))):
        start, stop, step = (index[dim] if dim < len(index) else slice(None)).indices(shape[dim])
        count = len(range(start, stop, step))
        sizes.append(count)
        strides.append(stride * step)
        first += start * stride
        last += (start + max(count - 1, 0) * step) * stride
        stride *= shape[dim]
    empty = 0 in sizes
    return _SliceLayout(tuple(reversed(sizes)), tuple(reversed(strides)), first * itemsize, 0 if empty else (last - first + 1) * itemsize)


def _header_problem(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"cannot read {path}: {problem}; it is not a valid safetensors file")


def read_header(path: Path, reader: SafetensorsReader) -> list[LazyTensor]:
    """The tensors of a safetensors file, from its header alone, checked as safetensors checks them.

    Only the first ``8 + header length`` bytes are read and nothing is mapped, so that a file larger
    than the process's address space, or than the memory the kernel lets it commit, opens. The
    tensors' data must tile the rest of the file exactly, as safetensors requires.
    """
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            if size < 8:
                raise _header_problem(path, f"it has {size} bytes, fewer than the 8 that give its header's length")
            handle.seek(0)
            length = int.from_bytes(handle.read(8), "little")
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise _header_problem(path, f"its header length is {length:,} bytes, in a file of {size:,} bytes")
            text = handle.read(length)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _header_problem(path, f"its header is not JSON text ({err})") from err
    del text
    if not isinstance(header, dict):
        raise _header_problem(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise _header_problem(path, "its __metadata__ is not an object of strings")
    data_start = 8 + length
    tensors = []
    while header:  # popped one by one, so that each entry's JSON objects are freed as its tensor is made
        name, entry = header.popitem()
        tensors.append(_header_tensor(path, name, entry, data_start, reader))
    tensors.sort(key=lambda tensor: (tensor.offset, tensor.nbytes))  # an empty tensor before the one at its offset
    end = data_start
    for tensor in tensors:
        if tensor.offset != end:
            start, before = tensor.offset - data_start, end - data_start
            raise _header_problem(path, f"the data of {tensor.name} starts at byte {start:,}, where the data before it ends at {before:,}")
        end += tensor.nbytes
    if end != size:
        held = size - data_start
        raise _header_problem(path, f"its tensors' data ends at byte {end - data_start:,}, but the file holds {held:,} bytes of data")
    return tensors


def _header_tensor(path: Path, name: str, entry: Any, data_start: int, reader: SafetensorsReader) -> LazyTensor:
    """One header entry as a ``LazyTensor``, its dtype readable and its byte range the size of its shape."""
    if not isinstance(entry, dict):
        raise _header_problem(path, f"its header entry for {name} is not an object")
    label, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise _header_problem(path, f"the shape of {name} is {json.dumps(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(n) is int for n in offsets) or not 0 <= offsets[0] <= offsets[1]:
        raise _header_problem(path, f"the data_offsets of {name} are {json.dumps(offsets)}")
    dtype = SAFETENSORS_DTYPES.get(label) if label not in _UNREADABLE else None
    if dtype is None:
        raise CheckpointError(f"tensor {name} in {path.name} has the safetensors dtype {label}, which the bridge cannot read")
    tensor = LazyTensor(name, path, torch.Size(shape), dtype, reader, data_start + offsets[0])
    if tensor.nbytes != offsets[1] - offsets[0]:
        span = offsets[1] - offsets[0]
        raise _header_problem(path, f"{name} ({label}, shape {shape}) takes {tensor.nbytes:,} bytes, but its data_offsets span {span:,}")
    return tensor


class _Window:
    """Bytes ``[start, end)`` of one file, memory-mapped copy-on-write, as a uint8 tensor.

    Copy-on-write as safetensors maps (tensors read are writable, the file never changes), but of
    a bounded length: the kernel charges a private writable map's whole length against the memory
    it lets processes commit, so a whole-file map of a shard larger than RAM is refused. Tensors
    read through the window keep it mapped; it is unmapped when the last of them dies.
    """

    __slots__ = ("bytes", "end", "path", "start")

    def __init__(self, path: Path, start: int, end: int):
        try:
            with open(path, "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), end - start, offset=start, access=mmap.ACCESS_COPY)
        except ValueError as err:  # the file is shorter than its header said: it changed while being read
            raise CheckpointError(f"cannot map bytes {start:,} to {end:,} of {path}: {err}") from err
        except OSError as err:  # out of memory or address space: say what was being mapped
            err.add_note(f"while mapping bytes {start:,} to {end:,} of {path}")
            raise
        self.path, self.start, self.end = path, start, end
        self.bytes = torch.frombuffer(mapped, dtype=torch.uint8)

    def covers(self, path: Path, lo: int, hi: int) -> bool:
        return path == self.path and self.start <= lo and hi <= self.end


class SafetensorsReader:
    """All tensors of a folder's safetensors files, by name, read through memory maps of bounded windows of the files.

    ``views`` (see ``bridge/hf_views.py``) present tensors stored in another layout (fused experts,
    renamed routers) under the names the mappings use.

    When ``model.safetensors.index.json`` exists only the files it names are read (as vLLM and
    transformers do); otherwise every ``*.safetensors`` file in the folder.

    The headers are read without mapping anything. A read maps a window of its file, at most
    ``max(reopen_bytes, one read)`` long (plus a page), that starts at its tensor when the tensor
    fits the window (so that the tensor's other slices, and the tensors after it, are read through
    the same map) and at the read otherwise; a read outside it maps the next window. One window is
    mapped at a time, so whatever the size of the files, the mapped pages (which count in the
    process's RSS while mapped) stay within about ``max(reopen_bytes, one read)`` and the address
    space and committed memory the maps take too (a window lives on while a tensor read from it, a
    view, does). The default bound is the largest tensor, at least ``MIN_REOPEN_BYTES``: every page
    is faulted in once either way, so mapping windows does not slow reading down.
    """

    def __init__(self, folder: Path, views: Sequence = (), reopen_bytes: int | None = None):
        self.folder = Path(folder)
        files = weight_files(self.folder)
        if not files:
            raise CheckpointError(f"no safetensors files in {self.folder}")
        self._file_of: dict[str, Path] = {}
        self._stored: dict[str, LazyTensor] = {}
        self._sizes: dict[Path, int] = {}
        for path in files:
            check_header(path)
            tensors = read_header(path, self)
            self._sizes[path] = path.stat().st_size
            for tensor in tensors:
                if tensor.name in self._file_of:
                    raise CheckpointError(f"tensor {tensor.name} is in both {self._file_of[tensor.name].name} and {path.name}")
                self._file_of[tensor.name] = path
                self._stored[tensor.name] = tensor
        largest = max((t.nbytes for t in self._stored.values()), default=0)
        self.reopen_bytes = reopen_bytes if reopen_bytes is not None else max(largest, MIN_REOPEN_BYTES)
        self._window: _Window | None = None
        self._virtual: dict[str, object] = {}
        for name in list(self._file_of):
            for view in views:
                expanded = view.expand(name, self._stored[name], self._stored)
                if expanded is not None:  # {}: a tensor the view reads through another's
                    self._virtual.update(expanded)
                    # a tensor presented under a stored name (an FP8 weight, through its scales) keeps that tensor's file
                    self._file_of.update({virtual: self._file_of.get(virtual, self._file_of[name]) for virtual in expanded})
                    del self._file_of[name]
                    break

    def read(self, tensor: LazyTensor, index: tuple[slice, ...]) -> torch.Tensor:
        """``tensor[index]``: a view of a mapped window of its file (a copy only where the file misaligns its dtype)."""
        layout = _slice_layout(tensor.shape, tensor.dtype.itemsize, index)
        if not layout.span:
            return torch.empty(layout.sizes, dtype=tensor.dtype)
        lo = tensor.offset + layout.first
        window = self._window_over(tensor, lo, lo + layout.span)
        block = window.bytes[lo - window.start : lo - window.start + layout.span]
        if lo % tensor.dtype.itemsize:  # windows start on pages: a dtype view needs the element's alignment in the file
            block = block.clone()
        return block.view(tensor.dtype).as_strided(layout.sizes, layout.strides)

    def _window_over(self, tensor: LazyTensor, lo: int, hi: int) -> _Window:
        """The mapped window holding bytes ``[lo, hi)`` of ``tensor``'s file: the current one, or the next, mapped in its place."""
        if self._window is not None and self._window.covers(tensor.path, lo, hi):
            return self._window
        self.release()  # before mapping the next, so that only one is mapped (unless views hold the last)
        begin = tensor.offset if tensor.nbytes <= self.reopen_bytes else lo
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        self._window = _Window(tensor.path, start, min(self._sizes[tensor.path], max(hi, start + self.reopen_bytes)))
        return self._window

    def release(self) -> None:
        """Drop the mapped window, so that the pages read through it leave the RSS; the next read maps another.

        A window lives on while a tensor read from it (a view) does: drop those first.
        """
        if self._window is not None:
            logger.debug("unmapping bytes %d to %d of %s", self._window.start, self._window.end, self._window.path)
        self._window = None

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def lazy(self, name: str) -> LazyTensor:
        if name in self._virtual:
            return self._virtual[name]  # type: ignore[return-value]
        if name not in self._file_of:
            raise CheckpointError(f"tensor {name} is not in the checkpoint {self.folder}")
        return self._stored[name]

    def shapes(self) -> dict[str, torch.Size]:
        return {name: self.lazy(name).shape for name in self._file_of}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {name: self.lazy(name).dtype for name in self._file_of}
