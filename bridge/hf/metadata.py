"""What an exported HF folder carries besides weights: config.json, generation config, tokenizer files.

Copied verbatim from the source folder where it has them (consumers such as vLLM read fields a
regenerated config would lose), patched only where the export changes something, plus the keys
older readers need: transformers 5 writes ``dtype`` and ``rope_parameters`` where transformers 4
(and the vLLM versions built on it) read ``torch_dtype``, ``rope_theta`` and ``rope_scaling`` — a v5
config read by v4 silently gets rope_theta=10000. The export carries both spellings, with the same values.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, PretrainedConfig

from bridge.hf.folder import SIDE_FILES, read_json  # read_json: also for the callers that read JSON through here

# Keys that differ between two configs of the same model without changing it.
# Keys that say how and where the weights were stored, not what the model is.
VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "dtype", "torch_dtype", "_commit_hash", "quantization_config"})


class ConfigMismatchError(ValueError):
    """A config disagrees with the weights written beside it, or with the config it should equal."""


def dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def export_config(source_folder: Path, hf_config: PretrainedConfig, dtype: torch.dtype | None, quantization: dict | None = None) -> dict:
    """The source config.json, verbatim but for the dtype when the export changes it, with old and new key spellings.

    ``quantization_config`` is the export's own (``quantization``): a source's (an MXFP4 gpt-oss, say) would make
    loaders read the written bf16 weights as quantized ones.
    """
    source = Path(source_folder) / "config.json"
    config = read_json(source) if source.exists() else hf_config.to_dict()
    config.pop("quantization_config", None)
    if quantization is not None:
        config["quantization_config"] = quantization
    if not config.get("architectures") and getattr(hf_config, "architectures", None):
        config["architectures"] = list(hf_config.architectures)
    # Explicit, so that a reader never falls back on a class default that disagrees with the weights.
    config.setdefault("tie_word_embeddings", bool(getattr(hf_config, "tie_word_embeddings", False)))
    name = dtype_name(dtype) if dtype is not None else (config.get("dtype") or config.get("torch_dtype"))
    if name is not None:
        config["dtype"] = config["torch_dtype"] = name
    add_legacy_rope_keys(config)
    return config


def add_legacy_rope_keys(config: dict) -> None:
    """Write rope settings in both spellings: v5 ``rope_parameters`` and v4 ``rope_theta`` / ``rope_scaling``.

    A source with only the v4 keys keeps them (transformers 5 reads them); per-layer-type rope
    parameters (Gemma 3) have no v4 spelling and are left as they are.
    """
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        config.setdefault("rope_theta", params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = scaling


def check_weights_match_config(config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """The weights agree with the config: vocabulary rows, ``lm_head`` present exactly when untied, an architecture."""
    problems = []
    if not config.get("architectures"):
        problems.append("config.json has no 'architectures' (loaders pick the model class from it)")
    vocab = config.get("vocab_size")
    for name, shape in shapes.items():
        if vocab is not None and (name.endswith("embed_tokens.weight") or name == "lm_head.weight") and shape[0] != vocab:
            problems.append(f"{name} has {shape[0]} rows but config.json says vocab_size={vocab} (vocabulary padding left in?)")
    tied = config.get("tie_word_embeddings")
    has_embedding = any(name.endswith("embed_tokens.weight") for name in shapes)
    if tied is True and "lm_head.weight" in shapes:
        problems.append("config.json says tie_word_embeddings=true but lm_head.weight is written (loaders would ignore or reject it)")
    if tied is False and has_embedding and "lm_head.weight" not in shapes:
        problems.append("config.json says tie_word_embeddings=false but no lm_head.weight is written")
    if problems:
        raise ConfigMismatchError("the exported weights do not match config.json: " + "; ".join(problems))


def config_differences(expected: dict, actual: dict, ignore: frozenset[str] = VOLATILE_CONFIG_KEYS) -> list[str]:
    """Keys whose values differ between two config dicts (``ignore``d keys aside), as readable lines."""
    lines = []
    for key in sorted(set(expected) | set(actual)):
        if key in ignore:
            continue
        a, b = expected.get(key, "<absent>"), actual.get(key, "<absent>")
        if a != b:
            lines.append(f"{key}: {a!r} vs {b!r}")
    return lines


def folder_metadata(
    source_folder: Path, hf_config: PretrainedConfig, dtype: torch.dtype | None, quantization: dict | None = None
) -> tuple[dict, dict[str, Path | str]]:
    """An export's config.json content (``export_config``) and its side files (``side_files``)."""
    return export_config(source_folder, hf_config, dtype, quantization), side_files(source_folder, hf_config)


def side_files(source_folder: Path, hf_config: PretrainedConfig) -> dict[str, Path | str]:
    """File name → path to copy (or text to write): the source's generation config and tokenizer files.

    A generation config is generated from the model config when the source has none.
    """
    source_folder = Path(source_folder)
    files: dict[str, Path | str] = {name: source_folder / name for name in SIDE_FILES if (source_folder / name).exists()}
    if "generation_config.json" not in files:
        files["generation_config.json"] = generation_config_text(hf_config)
    return files


def generation_config_text(hf_config: PretrainedConfig) -> str:
    return GenerationConfig.from_model_config(hf_config).to_json_string(use_diff=True)
