"""What a LoRA training checkpoint holds, and whether a run may resume from one.

A LoRA checkpoint stores the adapters, their optimizer state, the schedule, iteration and RNG, and
a record of the adapters' settings and of the base model (``train_state["lora"]``: ``r``, ``alpha``,
``targets``, ``dropout``, ``base_model``, the HF folder the base came from). It does not store the
frozen base weights: they never change, so a resume rebuilds the base from the HF folder (as the
first run did) and loads the adapters over it. A checkpoint is then a few MB for a multi-GB model,
and the base is the HF checkpoint bit for bit (training cannot have touched it).

Resuming is refused when the kinds disagree (a LoRA checkpoint into a full fine-tune or the reverse)
or the adapters' shapes or scale would (another ``r``, ``alpha`` or target list); a different base
folder is only warned about (a folder may have moved), the adapters' shapes are checked on load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from bridge.lora import LoraConfig, apply_lora, lora_config_of
from bridge.megatron import checkpoint as megatron_checkpoint
from bridge.megatron.checkpoint import MegatronCheckpointError
from bridge.megatron.chunks import is_adapter_param
from bridge.training.lora_args import lora_arguments_for

logger = logging.getLogger(__name__)


def lora_record(model, bridge=None) -> dict[str, Any] | None:
    """``train_state["lora"]`` for ``model``: its adapters' settings and the base's HF folder (None without adapters)."""
    config = lora_config_of(model)
    if config is None:
        return None
    base = None if bridge is None else str(Path(bridge.hf_folder).absolute())
    return {
        "r": config.r,
        "alpha": config.alpha,
        "targets": list(config.targets),
        "target_parameters": list(config.target_parameters),
        "dropout": config.dropout,
        "base_model": base,
    }


def config_of_record(record: dict[str, Any]) -> LoraConfig:
    """The ``LoraConfig`` a checkpoint's LoRA record describes."""
    return LoraConfig(
        r=record["r"],
        alpha=record["alpha"],
        targets=tuple(record["targets"]),
        dropout=record.get("dropout", 0.0),
        target_parameters=tuple(record.get("target_parameters", ())),
    )


def _adapted(config: LoraConfig) -> str:
    """``targets q_proj,v_proj`` (and ``target parameters experts.down_proj``), for messages."""
    text = f"targets {','.join(config.targets) or '-'}"
    return text + (f", target parameters {','.join(config.target_parameters)}" if config.target_parameters else "")


def check_resume(saved: dict[str, Any] | None, model, folder: Path, bridge=None) -> None:
    """Raise ``MegatronCheckpointError`` unless ``model`` can resume a run whose LoRA record is ``saved`` (None: a full fine-tune).

    The message says what to pass instead. With ``bridge``, a base folder other than the recorded one is logged as a warning.
    """
    config = lora_config_of(model)
    if saved is None and config is None:
        return
    if saved is None:
        raise MegatronCheckpointError(
            f"{folder} is a full fine-tune's checkpoint; a LoRA run cannot resume it (its optimizer state is the whole model's). "
            "Export it to HF (hfmb export) and train LoRA on that, or resume without --lora-rank"
        )
    recorded = config_of_record(saved)
    if config is None:
        raise MegatronCheckpointError(
            f"{folder} holds LoRA adapters only (the base is {saved.get('base_model')}); resume it with "
            + " ".join(lora_arguments_for(recorded))
        )

    def key(c: LoraConfig) -> tuple:
        return c.r, float(c.alpha), sorted(c.targets), sorted(c.target_parameters)

    if key(config) != key(recorded):
        raise MegatronCheckpointError(
            f"{folder} holds LoRA adapters r={recorded.r}, alpha={recorded.alpha:g}, {_adapted(recorded)}; "
            f"this run asks for r={config.r}, alpha={config.alpha:g}, {_adapted(config)}. "
            f"Resume with {' '.join(lora_arguments_for(recorded))}"
        )
    if bridge is not None and saved.get("base_model") and Path(saved["base_model"]) != Path(bridge.hf_folder).absolute():
        logger.warning(
            "%s was trained on the base %s; this run's base is %s (the adapters are loaded onto it)",
            folder,
            saved["base_model"],
            Path(bridge.hf_folder).absolute(),
        )


def split_model_state(model_state: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """``model_state_dict``'s entries (``model`` / ``model0`` …) split into (adapters, base): what a LoRA checkpoint
    saves and what a weights-only checkpoint gives a LoRA model. An entry is an adapter's when its tensor is an adapter parameter."""
    adapters: dict[str, dict] = {}
    base: dict[str, dict] = {}
    for key, entries in model_state.items():
        adapters[key] = {name: entry for name, entry in entries.items() if _is_adapter_entry(entry)}
        base[key] = {name: entry for name, entry in entries.items() if not _is_adapter_entry(entry)}
    return adapters, base


def _is_adapter_entry(entry: Any) -> bool:
    return is_adapter_param(getattr(entry, "data", None))


def saved_lora_record(root: str | Path, iteration: int | None | str = "latest") -> dict[str, Any] | None:
    """The LoRA record of a saved iteration (its adapters' config and base model), or None for a checkpoint of full weights."""
    from megatron.core import dist_checkpointing

    _, folder = megatron_checkpoint.complete_iteration(root, iteration)
    return (dist_checkpointing.load_common_state_dict(str(folder)).get("train_state") or {}).get("lora")


def load_lora_checkpoint(
    root: str | Path, iteration: int | None | str = "latest", base: str | Path | None = None, dtype: torch.dtype | None = None
):
    """``(bridge, model)``: the base rebuilt from its HF folder in this process (TP=PP=1) with a LoRA training
    checkpoint's adapters loaded onto it, ready for ``save_peft_adapter`` or ``save_merged_hf_pretrained``.

    ``base``: the HF folder of the base (default: the one the checkpoint records); ``dtype``: the model's
    (default: the base's stored one). Raises ``MegatronCheckpointError`` for a checkpoint without LoRA
    adapters, naming it.
    """
    from bridge import AutoBridge

    iteration, folder = megatron_checkpoint.complete_iteration(root, iteration)
    record = saved_lora_record(root, iteration)
    if record is None:
        raise MegatronCheckpointError(f"{folder} holds no LoRA adapters (export it without --adapter/--merge)")
    base = base or record.get("base_model")
    if not base:
        raise MegatronCheckpointError(f"{folder} does not record its base model: name its HF folder (--hf-config)")
    bridge = AutoBridge.from_hf_pretrained(base, dtype=dtype)
    model = bridge.to_megatron_model(load_weights=True)
    apply_lora(model, bridge, config_of_record(record))
    adapters, _ = split_model_state(megatron_checkpoint.model_state_dict(model))
    loaded = megatron_checkpoint.load_checkpoint(root, adapters, iteration)
    for chunk, key in zip(model, adapters):
        chunk.load_state_dict(loaded[key], strict=False)
    return bridge, model
