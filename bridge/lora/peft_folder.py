"""HF PEFT adapter folders: export the model's adapters as one (``adapter_config.json``, ``adapter_model.safetensors``),
stream them as ``(peft_name, tensor)`` pairs, and load one onto a converted model at any TP/PP layout.

The adapters move like the weights: a transfer plan over the adapter parameters (``adapter_plan``)
gathers them over TP/PP to global rank 0 (``export_tensors``), and a load reads each rank's slice
of the file (``load_checkpoint``). Adapters are small (r × hidden per module), so rank 0 holds them
all while it writes the one safetensors file.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from bridge.engine import load as engine_load
from bridge.engine.export import export_tensors
from bridge.engine.plan import validate_checkpoint
from bridge.hf.folder import read_json
from bridge.hf.output_folder import FolderKind, claimed_target
from bridge.hf.reader import SafetensorsReader
from bridge.lora.apply import adapter_plan, apply_lora, lora_config_of, remove_lora
from bridge.lora.config import LoraConfig, LoraError
from bridge.lora.expert_tensors import expert_adapter_views, join_expert_slices
from bridge.megatron.chunks import unwrap_chunks
from bridge.runtime.rank_errors import raise_everywhere, raise_first

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_ADAPTER_FOLDER = FolderKind("a PEFT adapter folder", files=(r"adapter_config\.json", r"adapter_model\.safetensors"))


def export_adapter_weights(model, bridge, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the adapters as peft's ``(name, tensor)`` pairs (``adapters_only`` export, e.g. for RL weight sync).

    Every rank must iterate; only global rank 0 receives pairs. Tensors are in the adapters' dtype
    unless ``dtype`` is given; at TP=1 they may share memory with the parameters (``clone()`` to keep).
    """
    pairs = export_tensors(adapter_plan(model, bridge))
    for name, tensor in join_expert_slices(pairs, _experts(model)):
        yield name, tensor if dtype is None else tensor.to(dtype)


def _experts(model) -> int:
    """The model's number of routed experts (0 without)."""
    return unwrap_chunks(model)[0].config.num_moe_experts or 0


def save_peft_adapter(
    model,
    bridge,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write the model's adapters as an HF PEFT adapter folder that ``peft.PeftModel.from_pretrained`` loads.

    All ranks call it; global rank 0 writes, into a temporary folder beside ``out_dir`` renamed into
    place at the end (a non-empty target is refused unless ``overwrite``, and then only one holding
    just an adapter's two files is replaced). ``base_model_name_or_path`` defaults to the bridge's HF folder.
    """
    config = lora_config_of(model)
    if config is None:
        raise LoraError("the model has no LoRA adapters; call apply_lora (or load_peft_adapter) first")
    tensors = {name: tensor.contiguous() for name, tensor in export_adapter_weights(model, bridge, dtype)}
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            doc = config.peft_config(base_model_name_or_path or str(bridge.hf_folder), bridge.model_bridge.peft_exclude_modules)
            _write_adapter_folder(Path(out_dir), tensors, doc, overwrite)
        except Exception as err:
            error = err
    raise_everywhere(error, src=0)


def _write_adapter_folder(out_dir: Path, tensors: dict[str, torch.Tensor], doc: dict, overwrite: bool) -> None:
    with claimed_target(out_dir, overwrite=overwrite, kind=PEFT_ADAPTER_FOLDER) as target:
        tmp = target.temp_path()
        tmp.mkdir()
        try:
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            target.publish(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("wrote %d adapter tensors to %s", len(tensors), out_dir)


def read_adapter_config(folder: str | Path, dtype: torch.dtype | None = None) -> LoraConfig:
    """The ``LoraConfig`` of a peft adapter folder (its tensors in ``dtype``: default the stored one when all agree)."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise LoraError(f"{folder} has no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    return LoraConfig.from_peft_config(read_json(folder / ADAPTER_CONFIG, LoraError), str(folder / ADAPTER_CONFIG), dtype)


def load_peft_adapter(model, bridge, folder: str | Path, *, dtype: torch.dtype | None = None) -> LoraConfig:
    """Apply the adapter of a peft LoRA folder to ``model`` (which has none yet) and load its tensors; all ranks call.

    The adapters get the stored dtype (one dtype for all, else pass ``dtype``), so an export writes
    the same bytes back. Raises ``LoraError`` / ``CheckpointError`` naming the setting or tensor
    (a rank or shape that disagrees with the config, an adapter of another architecture, missing or
    extra tensors) before any adapter value is loaded; the model is then left without adapters.
    """
    folder = Path(folder)
    reader = SafetensorsReader(folder)
    stored = set(reader.dtypes().values())
    if dtype is None and len(stored) > 1:
        raise LoraError(f"{folder / ADAPTER_WEIGHTS} mixes dtypes {sorted(map(str, stored))}; pass dtype=")
    config = read_adapter_config(folder, dtype or next(iter(stored)))
    apply_lora(model, bridge, config)
    error: Exception | None = None
    try:
        plan = adapter_plan(model, bridge)
        views = expert_adapter_views((name for mapping in plan.registry for name in mapping.hf_names), _experts(model))
        if views:  # peft's tensors of stacked expert parameters, as the per-expert slices the mappings name
            reader = SafetensorsReader(folder, views=views)
        validate_checkpoint(plan, reader)
    except Exception as err:
        error = err
    try:
        raise_first(error)
    except Exception:
        remove_lora(model)
        raise
    engine_load.load_checkpoint(plan, reader)
    return config
