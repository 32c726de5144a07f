"""Loading: each rank builds its own shards from the HF files, straight from the files' maps into its parameters.

Each rank reads only the slices its shards need (``"slice"``, the default), or one reader per TP
group builds every rank's shard and sends each its own (``"scatter"``); each PP stage loads only its
own layers.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from bridge.engine.device_upload import PinnedUpload
from bridge.engine.plan import PlanEntry, TransferPlan, progress, tp_group
from bridge.hf.reader import SafetensorsReader
from bridge.mappings import RowCopy
from bridge.runtime.gc_freeze import frozen_heap

logger = logging.getLogger(__name__)

LOAD_STRATEGIES = ("slice", "scatter")


@frozen_heap()
def load_checkpoint(plan: TransferPlan, reader: SafetensorsReader, strategy: str = "slice", staged: bool | None = None) -> None:
    """Copy the HF checkpoint into this rank's parameters (all ranks call this together).

    Parameters on a CUDA device are filled through pinned host buffers with non-blocking copies
    (``PinnedUpload``); ``staged=True`` sends CPU parameters that way too (tests run that path on
    the CPU), ``False`` none. The reader's mapped window is dropped at the end (``release``), so
    that the checkpoint's pages do not stay in this rank's resident memory beside the model.
    """
    if strategy not in LOAD_STRATEGIES:
        raise ValueError(f"load strategy {strategy!r}; choose one of {LOAD_STRATEGIES}")
    gpu = next((local.param.device for local in plan.local.values() if local.param.device.type == "cuda"), None)
    if staged is None:
        staged = gpu is not None
    upload = PinnedUpload.for_device(gpu or torch.device("cpu")) if staged else None
    spare = _ShardBuffer()
    try:
        for entry in progress(plan.local_entries(), "loading"):
            _load_one(plan, entry, reader, strategy, upload, spare)
    finally:
        if upload is not None:
            upload.finish()
            logger.debug("%.2f GB copied to the GPU through pinned buffers", upload.uploaded / 1e9)
        reader.release()  # the pages read would otherwise stay resident for as long as the reader lives


def _load_one(
    plan: TransferPlan, entry: PlanEntry, reader: SafetensorsReader, strategy: str, upload: PinnedUpload | None, spare: _ShardBuffer
) -> None:
    """Build and copy in one parameter's shard. Its own function so that the views of the files' maps die on return,
    letting the reader's next window release the pages they span."""
    mapping = plan.mapping(entry)
    param = plan.local[entry.name].param
    ctx = plan.context(entry)
    copy = upload.copy if upload is not None else None
    if strategy == "scatter" and ctx.tp_size > 1:
        _scatter_shard(plan, entry, reader, param.data, copy, spare)
    else:
        sources = {role: reader.lazy(name) for role, name in mapping.hf_param.items()}
        with torch.no_grad():
            mapping.hf_to_megatron(sources, ctx, out=param, copy=copy)  # straight from the file's map into the parameter


def _scatter_shard(
    plan: TransferPlan, entry: PlanEntry, reader: SafetensorsReader, param: torch.Tensor, copy: RowCopy | None, spare: _ShardBuffer
) -> None:
    """One reader per TP group builds every rank's shard and sends each rank its own, one at a time.

    The other ranks' shards are built in one reused buffer (``spare``), so the reader holds one
    shard beside its parameters, not the whole tensor (a ``dist.scatter`` needs every shard at once).
    """
    mapping = plan.mapping(entry)
    ctx = plan.context(entry)
    group = tp_group(entry.expert)
    ranks = dist.get_process_group_ranks(group)
    if ctx.tp_rank == 0:  # each shard straight from the file's map, with no copy of the whole tensor in between
        sources = {role: reader.lazy(name) for role, name in mapping.hf_param.items()}
        mapping.hf_to_megatron(sources, ctx, out=param, copy=copy)
        if mapping.tp_sharded:
            for tp_rank in range(1, ctx.tp_size):
                shard = mapping.hf_to_megatron(sources, plan.context(entry, tp_rank), out=spare.like(param), copy=copy)
                dist.send(shard, dst=ranks[tp_rank], group=group)  # returns once the buffer may be refilled
    if not mapping.tp_sharded:
        dist.broadcast(param, src=ranks[0], group=group)
    elif ctx.tp_rank != 0:
        dist.recv(param, src=ranks[0], group=group)


class _ShardBuffer:
    """Memory for the shard being sent, grown to the largest one and reused for all."""

    def __init__(self) -> None:
        self._raw: torch.Tensor | None = None

    def like(self, param: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``param``'s shape, dtype and device, in the reused memory."""
        if self._raw is None or self._raw.numel() < param.nbytes or self._raw.device != param.device:
            self._raw = None  # freed before the larger one is allocated
            self._raw = torch.empty(param.nbytes, dtype=torch.uint8, device=param.device)
        return self._raw[: param.nbytes].view(param.dtype).view(param.shape)
