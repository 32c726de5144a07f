"""Megatron-Core dist checkpoint (saved at any layout) → HF folder within ``--max-memory``; one process.

``dist_checkpointing``'s reader fills a few whole TP=1 parameters at a time (as many as fit the
budget) from the saved chunks that overlap them; each goes through ``megatron_to_hf`` into the HF
folder's writer, which writes it to disk before the next one is read, and is dropped. The files are
laid out up front from the meta model's exported names and shapes (``export_layout``). Peak memory
is about three copies of the parameters of one batch, whatever the model size; a parameter that
cannot be converted within the budget is refused before anything is written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed.checkpoint
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import CachedMetadataFileSystemReader
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from tqdm import tqdm

from bridge.engine.export import export_layout
from bridge.engine.plan import PlanEntry
from bridge.hf.folder_writer import HFFolderWriter
from bridge.megatron import checkpoint as mc
from bridge.megatron.streaming import DEFAULT_MAX_MEMORY, MemoryBudgetError, meta_model, region, returned_to_the_os, tensor_bytes
from bridge.runtime.gc_freeze import frozen_heap
from bridge.runtime.sizes import parse_size
from bridge.runtime.write_errors import disk_full_reported
from bridge.runtime.write_errors import size_text as _size_text

logger = logging.getLogger(__name__)

# Share of the budget set aside for writing, and the most a shard may hold (see docs/design.md): 1/_SHARD_SHARE.
_SHARD_SHARE = 4
# Share of the budget left to bookkeeping (model metadata, DCP plans) and allocator slack.
_SLACK_SHARE = 4


def _parameter_chunks(model_dict: dict) -> dict[str, list[ShardedTensor]]:
    """State-dict key → the ShardedTensors it is saved as (factories built; their data are meta views of the parameter)."""
    built = dict(model_dict)  # apply_factories replaces entries of this copy, not of the model's state dict
    apply_factories(built)
    return {key: [sh for sh in nested_values({key: value}) if isinstance(sh, ShardedTensor)] for key, value in built.items()}


def check_global_shapes(chunks: dict[str, list[ShardedTensor]], metadata: Metadata, folder: Path) -> None:
    """Every tensor the model needs is in the checkpoint with its global shape; raises before anything is read."""
    for sh in (sh for shards in chunks.values() for sh in shards):
        saved = metadata.state_dict_metadata.get(sh.key)
        if not isinstance(saved, TensorStorageMetadata):
            raise mc.MegatronCheckpointError(f"{sh.key} from model not in the checkpoint {folder}")
        if tuple(saved.size) != tuple(sh.global_shape):
            raise mc.MegatronCheckpointError(
                f"Global shape mismatch for loaded ({tuple(saved.size)}) and expected ({tuple(sh.global_shape)}) tensor for key {sh.key}"
            )


class _RegionLoadPlanner(LoadPlanner):
    """Reads given regions of global tensors (sharded key, global offset, tensor to fill) from a torch_dist checkpoint.

    Whatever layout the checkpoint was saved at, DCP's resharding reads the saved chunks that
    overlap each region (one saved chunk in memory at a time) and copies the overlap in.
    """

    def __init__(self, targets: dict[tuple[str, tuple[int, ...]], torch.Tensor]):
        self.targets = targets

    def set_up_planner(self, state_dict: dict, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for (key, offset), target in self.targets.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=target.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise mc.MegatronCheckpointError(f"{read_item.dest_index.fqn} is not a tensor")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        target = self.targets[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


def _read_parameters(
    reader: FileSystemReader, entries: list[PlanEntry], chunks: dict[str, list[ShardedTensor]], params: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """These parameters, whole, at TP=1, read from the checkpoint."""
    fulls: dict[str, torch.Tensor] = {}
    targets: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
    for entry in entries:
        full = fulls[entry.name] = torch.empty(entry.local_shape, dtype=entry.dtype)
        for sh in chunks[entry.name]:
            part = region(full, sh.data, params[entry.name])
            targets[(sh.key, tuple(sh.global_offset))] = part.view((1,) * sh.prepend_axis_num + tuple(sh.local_shape))
    torch.distributed.checkpoint.load({}, storage_reader=reader, planner=_RegionLoadPlanner(targets), no_dist=True)
    return fulls


def _batches(entries: list[PlanEntry], room: int) -> Iterator[list[PlanEntry]]:
    """Consecutive entries whose conversion (about three copies of each) fits ``room`` together."""
    batch: list[PlanEntry] = []
    used = 0
    for entry in entries:
        need = 3 * tensor_bytes(entry.local_shape, entry.dtype)
        if batch and used + need > room:
            yield batch
            batch, used = [], 0
        batch.append(entry)
        used += need
    if batch:
        yield batch


@frozen_heap()
def export_hf_folder(
    bridge,
    root: str | Path,
    out_dir: str | Path,
    *,
    padded_vocab_size: int,
    iteration: int | None | str = "latest",
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    target_dtype: Callable[[str, torch.dtype], torch.dtype] | None = None,
    config: dict,
    side_files: dict[str, Path | str] | None = None,
    check: Callable[[Path], None] | None = None,
) -> bool:
    """Stream a Megatron checkpoint (any layout it was saved at) into an HF folder within ``max_memory``; one process.

    ``target_dtype(hf_name, dtype)`` picks each tensor's dtype (default: the model's). The folder
    is written atomically by ``HFFolderWriter``, in shards of at most a quarter of the budget.
    ``check(folder)`` (transformers' load check) runs before publishing when the weights fit half
    the budget, and is skipped with a warning otherwise; returns whether it ran.
    """
    budget = parse_size(max_memory)
    shard = min(parse_size(max_shard_size), budget // _SHARD_SHARE)
    if shard < parse_size(max_shard_size):
        logger.info("shards of at most %s, to stay within --max-memory %s", _size_text(shard), _size_text(budget))
    if iteration == "latest":
        iteration = mc.latest_iteration(root)
    folder = mc.iteration_dir(root, iteration)  # type: ignore[arg-type]
    if not (folder / "metadata.json").exists():
        raise mc.MegatronCheckpointError(f"{folder} is not a complete dist checkpoint (no metadata.json)")
    _, plan, state = meta_model(bridge, padded_vocab_size=padded_vocab_size)
    entries = plan.exported_entries()
    room = budget - shard - budget // _SLACK_SHARE
    for entry in entries:
        need = 3 * tensor_bytes(entry.local_shape, entry.dtype)
        if need > room:
            raise MemoryBudgetError(
                f"{entry.name} needs about {_size_text(need)} to convert, but --max-memory {_size_text(budget)} leaves "
                f"{_size_text(room)} for it beside the {_size_text(shard)} set aside for writing and bookkeeping; "
                f"raise --max-memory to at least {_size_text(2 * need + 1)}"
            )
    (model_key,) = [key for key, value in state.items() if isinstance(value, dict)]
    chunks = _parameter_chunks(state[model_key])
    reader = CachedMetadataFileSystemReader(str(folder))  # one read of .metadata for all the batches
    check_global_shapes(chunks, reader.read_metadata(), folder)
    params = {name: plan.local[name].param for name in plan.local}
    missing = [entry.name for entry in entries if not chunks.get(entry.name)]
    if missing:
        raise mc.MegatronCheckpointError(f"parameters with no entry in the model's sharded state dict: {', '.join(missing)}")
    layout = export_layout(plan, target_dtype, shard)
    weights = layout.data_bytes

    def bounded_check(tmp_dir: Path) -> None:
        if 2 * weights > budget:  # transformers would hold the whole model (and a copy while loading it)
            logger.warning(
                "not loading the export in transformers: its %s of weights do not fit --max-memory %s",
                _size_text(weights),
                _size_text(budget),
            )
            return
        check(tmp_dir)  # type: ignore[misc]
        checked.append(tmp_dir)

    checked: list[Path] = []
    with (
        disk_full_reported(Path(out_dir), layout.file_bytes),
        returned_to_the_os(),
        HFFolderWriter(out_dir, layout, overwrite=overwrite) as writer,
    ):
        with tqdm(total=len(entries), desc="exporting", unit="tensor", delay=2.0) as progress:
            for batch in _batches(entries, room):
                loaded = _read_parameters(reader, batch, chunks, params)
                for entry in batch:
                    for name, tensor in plan.mapping(entry).megatron_to_hf([loaded.pop(entry.name)], plan.context(entry, 0)).items():
                        writer.add(name, tensor if target_dtype is None else tensor.to(target_dtype(name, tensor.dtype)))
                    progress.update(1)
                del loaded
        writer.finish(config, side_files, check=None if check is None else bounded_check)
    return bool(checked)
