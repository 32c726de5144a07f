"""Reading an HF checkpoint folder: where it is, its config, and its safetensors tensors, lazily.

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
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import torch

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
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
# Dtypes a float weight may be stored in. Any other (integers, bool, fp8, complex) would be imported
# by a cast that changes what the values mean: quantized checkpoints need their own formats.
WEIGHT_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})
# Most bytes of a tensor read at once when counting its NaN/Inf values, so that counting a huge tensor stays small.
COUNT_BLOCK_BYTES = 8 * 2**20
# Files besides the weights that a complete HF folder carries and an export copies verbatim.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
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
# Config settings that must be positive integers (when present and not null): a 0, a negative or a
# string would otherwise fail deep inside transformers or Megatron-Core with a message naming neither.
POSITIVE_CONFIG_SETTINGS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


class CheckpointError(ValueError):
    """The HF checkpoint is missing, unreadable or does not match what the model needs."""


def resolve_hf_folder(path_or_id: str | Path) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (config, weights, tokenizer) to the HF cache."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected an HF checkpoint folder or a Hub repo id")
    if _looks_like_a_path(str(path_or_id)):
        raise CheckpointError(f"no such folder: {path_or_id}")
    from huggingface_hub import snapshot_download

    logger.info("downloading %s from the Hugging Face Hub", path_or_id)
    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=_HUB_PATTERNS))
    except Exception as err:
        raise CheckpointError(f"{path_or_id!r} is neither a local folder nor a Hub repo that could be downloaded: {err}") from err


def _looks_like_a_path(text: str) -> bool:
    """Whether ``text`` can only be a local path: a Hub repo id is ``name`` or ``namespace/name``, never absolute or dotted."""
    return text.startswith(("/", "./", "../", "~", ".\\")) or text in (".", "..") or text.count("/") > 1 or text.endswith("/")


def read_json(path: str | Path, error: type[ValueError] = CheckpointError) -> dict[str, Any]:
    """The JSON object in ``path``; raises ``error`` naming the file when it is empty, not JSON or not an object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path} is not a JSON file (not UTF-8 text: {err})") from err
    if not text.strip():
        raise error(f"{path} is empty; expected a JSON object")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {type(value).__name__}; expected a JSON object")
    return value


def dtype_named(name: Any) -> torch.dtype | None:
    """The torch dtype a config or ``bridge.json`` names (``"bfloat16"``), or None when ``name`` names none."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def read_hf_config(folder: Path, trust_remote_code: bool = False):
    """``folder``'s config.json as transformers reads it; a broken file or setting raises ``CheckpointError`` naming it."""
    from transformers import AutoConfig

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; expected an HF checkpoint folder")
    check_config_settings(path, read_json(path))
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers' own validation: its messages rarely name the file
        raise CheckpointError(f"transformers cannot read {path}: {type(err).__name__}: {err}") from err


def check_config_settings(path: Path, config: dict[str, Any]) -> None:
    """Refuse settings that would fail later with a message naming neither file nor setting (dtype, sizes)."""
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if value is not None and dtype_named(value) is None:
            raise CheckpointError(
                f"{path}: {key} is {json.dumps(value)}, which is not a torch dtype (e.g. 'bfloat16', 'float16', 'float32')"
            )
    for key in POSITIVE_CONFIG_SETTINGS:
        value = config.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise CheckpointError(f"{path}: {key} is {json.dumps(value)}; it must be a positive integer")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of ``folder``: those its index names (as vLLM and transformers read), else every ``*.safetensors``.

    An index entry must name a file inside the folder: an absolute path or a ``..`` is refused.
    """
    folder = Path(folder)
    index = folder / INDEX_NAME
    if not index.exists():
        return sorted(folder.glob("*.safetensors"))
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no 'weight_map' (an object of tensor name → safetensors file name)")
    files = set()
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CheckpointError(f"{index}: the weight_map entry for {name} is {json.dumps(file)}; expected a safetensors file name")
        relative = PurePosixPath(file)
        if relative.is_absolute() or ".." in relative.parts:
            raise CheckpointError(f"{index}: the weight_map entry for {name} ({json.dumps(file)}) points outside the model folder {folder}")
        files.add(folder / relative)
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{INDEX_NAME} names {path.name}, which is not in {folder}")
    return sorted(files)


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
                expanded = view.expand(name, self._stored[name])
                if expanded:
                    self._virtual.update(expanded)
                    self._file_of.update({virtual: self._file_of[name] for virtual in expanded})
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


def non_float_weights(reader: SafetensorsReader, names: Iterable[str]) -> list[str]:
    """A line for each of ``names`` (float weights the model reads) stored in a dtype other than ``WEIGHT_DTYPES``.

    Importing one would cast it: int8 or fp8 codes without their scales, or a bool mask, would
    silently become weights of another meaning.
    """
    problems = []
    for name in names:
        if name not in reader:
            continue
        dtype = reader.lazy(name).dtype
        if dtype not in WEIGHT_DTYPES:
            problems.append(f"{name} in {reader.file_of(name).name} is {str(dtype).removeprefix('torch.')}")
    return problems


@dataclass(frozen=True)
class NonFinite:
    """How many NaN and ±Inf values a tensor holds, of how many."""

    nan: int
    inf: int
    total: int

    def __bool__(self) -> bool:
        return bool(self.nan or self.inf)


def count_nonfinite(tensor) -> NonFinite:
    """NaN and ±Inf values in ``tensor`` (a ``LazyTensor`` or a view of one), read in blocks of rows.

    Each block is at most ``COUNT_BLOCK_BYTES`` (one row at least) and is dropped before the next
    is read, so that counting streams however large the tensor is.
    """
    if not tensor.shape:  # a scalar: nothing to narrow
        return _count_block(tensor.select_slice(()))
    rows = tensor.shape[0]
    row_bytes = max(1, torch.Size(tensor.shape[1:]).numel() * tensor.dtype.itemsize)
    step = max(1, COUNT_BLOCK_BYTES // row_bytes)
    nan = inf = 0
    for start in range(0, rows, step):
        found = _count_block(tensor.narrow(0, start, min(step, rows - start)))
        nan, inf = nan + found.nan, inf + found.inf
    return NonFinite(nan, inf, tensor.shape.numel())


def _count_block(block: torch.Tensor) -> NonFinite:
    if bool(torch.isfinite(block).all()):
        return NonFinite(0, 0, block.numel())
    return NonFinite(int(torch.isnan(block).sum()), int(torch.isinf(block).sum()), block.numel())


def nonfinite_counts(reader: SafetensorsReader, names: Iterable[str]) -> dict[str, NonFinite]:
    """The counts of those of ``names`` that hold NaN or Inf, one tensor at a time.

    Names not in the checkpoint and tensors not of a float weight's dtype are skipped: validation
    reports them.
    """
    counts = {}
    for name in names:
        if name in reader and reader.lazy(name).dtype in WEIGHT_DTYPES and (found := count_nonfinite(reader.lazy(name))):
            counts[name] = found
    return counts
