"""Checkpoints the bridge did not write (Megatron-LM's training, the reference bridge), named with their HF config.

``hfmb import`` and training runs through the bridge record what exporting needs (``bridge.json``,
``hf_config/``). A checkpoint written elsewhere has only its tensors: this module derives the same
record from the checkpoint's own metadata (padded vocabulary, parameter dtype) and the HF folder the
user names, and checks that every tensor the model of that config needs is in the checkpoint with
its shape, naming the first that is not, before anything loads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from bridge.hf.metadata import dtype_name
from bridge.megatron.checkpoint import (
    MegatronCheckpointError,
    check_global_shapes,
    complete_iteration,
    hf_config_folder,
    read_source_info,
)

EMBEDDING = "embedding.word_embeddings.weight"


def checkpoint_record(root: str | Path, hf_config: str | Path | None, iteration: int | str | None = "latest") -> tuple[dict, Path]:
    """``bridge.json``'s content and the HF config folder for the checkpoint at ``root``.

    Without ``hf_config`` the checkpoint must carry its own record; with it, the record is derived
    from the checkpoint's metadata and that folder (which may be the original HF folder: its weight
    dtypes are then the export's).
    """
    if hf_config is None:
        return read_source_info(root), hf_config_folder(root)
    return derived_record(root, Path(hf_config), iteration), Path(hf_config)


def stored_tensors(root: str | Path, iteration: int | str | None = "latest") -> dict[str, ShardedTensor]:
    """The tensors of a saved iteration (key → global shape and dtype), from its metadata alone."""
    folder = complete_iteration(root, iteration)[1]
    try:
        stored = dist_checkpointing.load_tensors_metadata(str(folder))
    except Exception as err:  # dist_checkpointing's words for a folder it cannot read
        raise MegatronCheckpointError(f"cannot read the tensor metadata of {folder}: {err}") from err
    return {key: value for key, value in stored.items() if isinstance(value, ShardedTensor)}


def stored_mtp_layers(root: str | Path, iteration: int | str | None = "latest") -> int:
    """How many multi-token-prediction layers (Megatron-Core's ``mtp.layers.*``) the saved iteration holds."""
    return len({match.group(1) for key in stored_tensors(root, iteration) if (match := re.match(r"mtp\.layers\.(\d+)\.", key))})


def derived_record(root: str | Path, hf_folder: Path, iteration: int | str | None = "latest") -> dict[str, Any]:
    """What ``bridge.json`` would hold, from the checkpoint's tensors and the HF folder ``hf_folder``."""
    from bridge.auto_bridge import AutoBridge

    stored = stored_tensors(root, iteration)
    embedding = stored.get(EMBEDDING)
    if embedding is None:
        raise MegatronCheckpointError(f"{root} has no {EMBEDDING}: it is not a Megatron-Core GPT checkpoint")
    bridge = AutoBridge.from_hf_pretrained(hf_folder, dtype=embedding.dtype)
    has_weights = any(hf_folder.glob("*.safetensors"))
    return {
        "architecture": bridge.model_bridge.architecture,
        "source": str(hf_folder),
        "source_folder": str(hf_folder.absolute()),
        "saved_with": {},
        "params_dtype": dtype_name(embedding.dtype),
        "vocab_size": bridge.model_bridge.vocab_size,
        "padded_vocab_size": int(embedding.global_shape[0]),
        "tie_word_embeddings": bridge.model_bridge.tie_word_embeddings,
        "hf_dtypes": {name: dtype_name(d) for name, d in sorted(bridge.reader.dtypes().items())} if has_weights else {},
        "dtype_cast": None,
    }


def check_fits(model_state: dict, root: str | Path, iteration: int | str | None = "latest") -> None:
    """Every tensor of ``model_state`` (Megatron-LM's model entries) is saved at ``root`` with its global shape."""
    saved = {key: tuple(tensor.global_shape) for key, tensor in stored_tensors(root, iteration).items()}
    check_global_shapes((v for v in nested_values(model_state) if isinstance(v, ShardedTensor)), saved, root)
