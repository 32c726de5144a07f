"""Reading an HF checkpoint folder: where it is, its config, and its safetensors tensors, lazily.

Each safetensors file is opened once (memory-mapped) and a tensor is read only when a mapping
narrows it, so a rank that needs one TP slice reads just that slice.
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
_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
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
    """One tensor of a safetensors file; ``narrow`` reads only the slice asked for."""

    def __init__(self, name: str, path: Path, handle):
        self.name = name
        self.path = path
        self._slice = handle.get_slice(name)
        self.shape = torch.Size(self._slice.get_shape())
        self.dtype = _DTYPES[self._slice.get_dtype()]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if start < 0 or start + length > self.shape[dim]:
            raise CheckpointError(
                f"{self.name} in {self.path.name}: slice [{start}:{start + length}] of dim {dim} is outside its shape {list(self.shape)}"
            )
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._slice[index]

    def select_slice(self, index: tuple[slice, ...]) -> torch.Tensor:
        """A multi-dimensional slice, read from disk."""
        return self._slice[index]

    def __repr__(self) -> str:
        return f"LazyTensor({self.name}, {list(self.shape)}, {self.dtype})"


class SafetensorsReader:
    """All tensors of a folder's safetensors files, by name. Files are opened once, on construction.

    ``views`` (see ``bridge/hf_views.py``) present tensors stored in another layout (fused experts,
    renamed routers) under the names the mappings use.

    When ``model.safetensors.index.json`` exists only the files it names are read (as vLLM and
    transformers do); otherwise every ``*.safetensors`` file in the folder.
    """

    def __init__(self, folder: Path, views: Sequence = ()):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.folder / f for f in weight_map.values()})
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no safetensors files in {self.folder}")
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        for path in files:
            if not path.exists():
                raise CheckpointError(f"{INDEX_NAME} names {path.name}, which is not in {self.folder}")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as err:
                raise CheckpointError(f"cannot read {path}: {err}") from err
            self._handles[path] = handle
            for name in handle.keys():
                if name in self._file_of:
                    raise CheckpointError(f"tensor {name} is in both {self._file_of[name].name} and {path.name}")
                self._file_of[name] = path
        self._virtual: dict[str, object] = {}
        for name in list(self._file_of):
            for view in views:
                expanded = view.expand(name, self.lazy(name))
                if expanded:
                    self._virtual.update(expanded)
                    self._file_of.update({virtual: self._file_of[name] for virtual in expanded})
                    del self._file_of[name]
                    break

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
        path = self._file_of[name]
        return LazyTensor(name, path, self._handles[path])

    def shapes(self) -> dict[str, torch.Size]:
        return {name: self.lazy(name).shape for name in self._file_of}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {name: self.lazy(name).dtype for name in self._file_of}
