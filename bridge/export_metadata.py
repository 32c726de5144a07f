"""What an exported HF folder carries besides weights: config.json, generation config, tokenizer files.

Copied verbatim from the source folder where it has them (consumers such as vLLM read fields a
regenerated config would lose), patched only where the export changes something.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from transformers import GenerationConfig, PretrainedConfig

from bridge.hf_checkpoint import SIDE_FILES


def export_config(source_folder: Path, hf_config: PretrainedConfig, dtype: torch.dtype | None) -> dict:
    """The source config.json, verbatim but for the dtype when the export changes it."""
    source = source_folder / "config.json"
    config = json.loads(source.read_text()) if source.exists() else hf_config.to_dict()
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    return config


def side_files(source_folder: Path, hf_config: PretrainedConfig) -> dict[str, Path]:
    """File name → path to copy: the source's generation config and tokenizer files (a generated generation config if it has none)."""
    files = {name: source_folder / name for name in SIDE_FILES if (source_folder / name).exists()}
    if "generation_config.json" not in files:
        files["generation_config.json"] = _generation_config_file(hf_config)
    return files


def _generation_config_file(hf_config: PretrainedConfig) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="bridge-genconfig-"))
    GenerationConfig.from_model_config(hf_config).save_pretrained(folder)
    return folder / "generation_config.json"
