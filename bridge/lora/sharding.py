"""The adapters' entries in Megatron-Core's sharded state dict (dist checkpoints and the optimizer's state).

An adapter lives inside the linear it adapts (``<linear>.lora.lora_A.<target>``), so the linear's own
``sharded_state_dict`` (Megatron-Core's ``ColumnParallelLinear`` / ``RowParallelLinear``) sees its
tensors. That method knows only ``weight`` and ``bias`` and makes every other key a replicated
``ShardedTensor``: a TP-split adapter (B of a column-parallel linear, A of a row-parallel one) would be
saved from TP rank 0 alone with its local shape as the global one, and a checkpoint would neither
hold the other ranks' rows nor load at another TP size.

``install_adapter_sharding`` gives each adapted linear (that instance only) a ``sharded_state_dict``
that calls the class's method and replaces the adapter's entries by ``adapter_sharded_state_dict``:
split tensors TP-sharded along the axis they are split on (B: 0, A: 1), whole ones replicated, both
through Megatron-Core's ``make_sharded_tensors_for_checkpoint`` with the layer offsets the linear
got. Global shapes are then the TP=1 shapes, so a checkpoint saved at one TP/PP layout loads at
another, and the distributed optimizer shards the adapters' state the same way. A B spanning a gated
``linear_fc1``'s gate and up rows (a stacked expert parameter's) holds this rank's gate rows, then its
up rows: it is saved through Megatron-Core's ``apply_swiglu_sharded_factory``, as the weight is. A
routed expert's linear gets the expert axis in its offsets and its expert-TP group from ``SequentialMLP``.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_tensor_model_parallel_group_if_none

from bridge.lora.layers import LoraAdapter
from bridge.lora.targets import ADAPTER_MODULE


def split_axis(adapter: LoraAdapter) -> tuple[str, int]:
    """Which matrix of ``adapter`` is split over TP and along which axis: ``("lora_A", 1)`` row-parallel, else ``("lora_B", 0)``."""
    return ("lora_A", 1) if adapter.row_parallel else ("lora_B", 0)


def adapter_sharded_state_dict(
    adapter: LoraAdapter,
    prefix: str,
    sharded_offsets: tuple = (),
    metadata: dict | None = None,
    tp_group: torch.distributed.ProcessGroup | None = None,
) -> dict[str, Any]:
    """``ShardedTensor``s of the adapter's A and B under ``prefix`` (``…linear_qkv.lora.``), keeping the parameters themselves.

    The split matrix is TP-sharded (``make_tp_sharded_tensor_for_checkpoint`` along ``split_axis``),
    the other replicated over TP and DP; ``sharded_offsets`` (the layer axis) are prepended to both.
    ``tp_group``: the linear's TP group (default: Megatron's).
    """
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    tp_group = get_tensor_model_parallel_group_if_none(tp_group)
    matrix, axis = split_axis(adapter)
    axes = {f"{matrix}.{target}": axis for target in adapter.targets}
    state = adapter.state_dict(prefix="", keep_vars=True)
    sharded = make_sharded_tensors_for_checkpoint(
        state, prefix, axes, sharded_offsets, tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"]
    )
    for target in adapter.gated_targets:
        key = f"{prefix}lora_B.{target}"
        sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, metadata.get("singleton_local_shards", False))
    return sharded


def _linear_with_adapter_sharded_state_dict(
    self: torch.nn.Module, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
) -> dict[str, Any]:
    """The adapted linear's ``sharded_state_dict``: its class's entries with the adapter's replaced by correctly sharded ones."""
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    state = type(self).sharded_state_dict(self, prefix, sharded_offsets, metadata)
    adapter_prefix = f"{prefix}{ADAPTER_MODULE}."
    adapter = getattr(self, ADAPTER_MODULE)
    own = adapter_sharded_state_dict(adapter, adapter_prefix, sharded_offsets, metadata, getattr(self, "tp_group", None))
    made = {key for key in state if key.startswith(adapter_prefix)}
    if made != set(own):  # a Megatron-Core change in what the linear emits: fail loudly rather than save a wrong checkpoint
        raise RuntimeError(f"{prefix}: the linear's sharded state has adapter entries {sorted(made)}, the adapter {sorted(own)}")
    state.update(own)
    return state


def install_adapter_sharding(linear: torch.nn.Module) -> None:
    """Make ``linear.sharded_state_dict()`` emit its adapter (``linear.lora``) correctly sharded (this instance only)."""
    linear.sharded_state_dict = types.MethodType(_linear_with_adapter_sharded_state_dict, linear)


def remove_adapter_sharding(linear: torch.nn.Module) -> None:
    """Give ``linear`` back its class's ``sharded_state_dict``."""
    linear.__dict__.pop("sharded_state_dict", None)
