"""Reading an HF checkpoint folder: where it is, its config, and its safetensors tensors, lazily.

Each safetensors file is memory-mapped and a tensor is read only when a mapping narrows it, so a
rank that needs one TP slice reads just that slice; the maps are closed and re-opened as reading
goes on, so that the pages read stay out of the resident memory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
# safetensors dtype name → torch dtype, as ``safetensors.torch`` names them (the writer uses it inverted).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    label: dtype
    for label, attr in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
        ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2", "float8_e5m2"),
        ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu"), ("F4", "float4_e2m1fn_x2"),
        ("C64", "complex64"),
    )
    if (dtype := getattr(torch, attr, None)) is not None
}
# Names the reader refuses: F4's recorded shape counts 4-bit values, not torch elements.
_UNREADABLE = frozenset({"F4"})
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
# Least bytes read between two re-opens of the files (see ``SafetensorsReader``), so that small models re-open rarely.
MIN_REOPEN_BYTES = 64 * 2**20


class CheckpointError(ValueError):
    """The HF checkpoint is missing, unreadable or does not match what the model needs."""


def resolve_hf_folder(path_or_id: str | Path) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (config, weights, tokenizer) to the HF cache."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected an HF checkpoint folder or a Hub repo id")
    from huggingface_hub import snapshot_download

    logger.info("downloading %s from the Hugging Face Hub", path_or_id)
    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=_HUB_PATTERNS))
    except Exception as err:
        raise CheckpointError(f"{path_or_id!r} is neither a local folder nor a Hub repo that could be downloaded: {err}") from err


class LazyTensor:
    """One tensor of a safetensors file; ``narrow`` reads only the slice asked for.

    It reads through its reader (not a file handle of its own), so it stays valid when the reader
    re-opens its files, and holding it does not keep a released mapping alive.
    """

    def __init__(self, name: str, path: Path, shape: torch.Size, dtype: torch.dtype, reader: "SafetensorsReader"):
        self.name = name
        self.path = path
        self.shape = shape
        self.dtype = dtype
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


def _span_bytes(shape: torch.Size, itemsize: int, index: tuple[slice, ...]) -> int:
    """Bytes from the first to the last element of ``shape[index]`` in the row-major file: the pages reading it touches."""
    first = last = 0
    stride = itemsize
    for dim in reversed(range(len(shape))):
        start, stop, step = (index[dim] if dim < len(index) else slice(None)).indices(shape[dim])
        if stop <= start:
            return 0
        first += start * stride
        last += (start + (stop - start - 1) // step * step) * stride
        stride *= shape[dim]
    return last - first + itemsize


class SafetensorsReader:
    """All tensors of a folder's safetensors files, by name, read through memory maps that are bounded in size.

    ``views`` (see ``bridge/hf_views.py``) present tensors stored in another layout (fused experts,
    renamed routers) under the names the mappings use.

    When ``model.safetensors.index.json`` exists only the files it names are read (as vLLM and
    transformers do); otherwise every ``*.safetensors`` file in the folder.

    safetensors memory-maps each file, and every page a read touches stays resident (counted in
    the process's RSS) until the map is closed. So the reader closes its maps (``release``) before a
    read that would take the bytes read through them past ``reopen_bytes``, and opens a file again
    on the next read from it: the mapped pages stay within about ``max(reopen_bytes, one read)``
    (a map lives on while a tensor read from it does). The default bound is the largest tensor,
    at least ``MIN_REOPEN_BYTES``: re-opening costs a header parse, and every page is faulted in
    once either way, so frequent re-opens do not slow reading down.
    """

    def __init__(self, folder: Path, views: Sequence = (), reopen_bytes: int | None = None):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.folder / f for f in weight_map.values()})
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no safetensors files in {self.folder}")
        self._handles: dict[Path, object] = {}
        self._file_of: dict[str, Path] = {}
        self._stored: dict[str, LazyTensor] = {}
        for path in files:
            if not path.exists():
                raise CheckpointError(f"{INDEX_NAME} names {path.name}, which is not in {self.folder}")
            handle = self._handle(path)
            for name in handle.keys():
                if name in self._file_of:
                    raise CheckpointError(f"tensor {name} is in both {self._file_of[name].name} and {path.name}")
                self._file_of[name] = path
                part = handle.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(part.get_dtype()) if part.get_dtype() not in _UNREADABLE else None
                if dtype is None:
                    raise CheckpointError(f"tensor {name} in {path.name} has the safetensors dtype {part.get_dtype()}, which the bridge cannot read")
                self._stored[name] = LazyTensor(name, path, torch.Size(part.get_shape()), dtype, self)
        largest = max((t.nbytes for t in self._stored.values()), default=0)
        self.reopen_bytes = reopen_bytes if reopen_bytes is not None else max(largest, MIN_REOPEN_BYTES)
        self._read_since_open = 0
        self._virtual: dict[str, object] = {}
        for name in list(self._file_of):
            for view in views:
                expanded = view.expand(name, self._stored[name])
                if expanded:
                    self._virtual.update(expanded)
                    self._file_of.update({virtual: self._file_of[name] for virtual in expanded})
                    del self._file_of[name]
                    break

    def _handle(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as err:
                raise CheckpointError(f"cannot read {path}: {err}") from err
        return self._handles[path]

    def read(self, tensor: LazyTensor, index: tuple[slice, ...]) -> torch.Tensor:
        """``tensor[index]``: a view of the file's map; its pages count towards ``reopen_bytes``."""
        span = _span_bytes(tensor.shape, tensor.dtype.itemsize, index)
        if self._read_since_open and self._read_since_open + span > self.reopen_bytes:
            self.release()
        self._read_since_open += span
        return self._handle(tensor.path).get_slice(tensor.name)[index]

    def release(self) -> None:
        """Close the files' maps, so that the pages read so far leave the RSS; the next read opens them again.

        A map lives on while a tensor read from it (a view) does: drop those first.
        """
        if self._handles:
            logger.debug("closing the maps of %s after %.1f MiB read", self.folder, self._read_since_open / 2**20)
        self._handles.clear()
        self._read_since_open = 0

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

