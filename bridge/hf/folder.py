"""An HF checkpoint folder: where it is (local or downloaded from the Hub), its config, and which files hold its weights.

Every problem is a ``CheckpointError`` naming the file or setting at fault.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any

import torch

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
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
