"""Megatron-Core dist checkpoint (saved at any layout) → HF folder within ``--max-memory``; one process.

``dist_checkpointing``'s reader fills a few whole TP=1 parameters at a time (a batch: as many as fit
the budget, up to ``BATCH_BYTES``) from the saved chunks that overlap them; each goes through
``megatron_to_hf`` into the HF folder's writer, which streams it to disk through two staging buffers
before the next batch is read, and is dropped. The files are laid out up front from the meta
model's exported names and shapes (``export_layout``), in shards of ``--max-shard-size``. What a
batch holds: ``_Batch.held``. A budget below what the largest parameter holds alone, with the margin, is
refused before anything is written, naming it and the budget that would do.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
import torch.distributed.checkpoint
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import CachedMetadataFileSystemReader
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from tqdm import tqdm

from bridge.engine.export import encoded, export_layout, write_carried
from bridge.engine.plan import PlanEntry, TransferPlan
from bridge.hf.data_appender import STAGE_BYTES
from bridge.hf.folder_writer import HFFolderWriter
from bridge.mappings import TensorSource
from bridge.megatron import checkpoint as mc
from bridge.megatron import streaming
from bridge.megatron.streaming import meta_model, model_chunks, region, returned_to_the_os, tensor_bytes
from bridge.runtime.gc_freeze import frozen_heap
from bridge.runtime.memory_budget import MemoryBudget
from bridge.runtime.peak_memory import PeakMemory
from bridge.runtime.sizes import parse_size
from bridge.runtime.write_errors import disk_full_reported, size_text

logger = logging.getLogger(__name__)

# Parameters read in one batch at most (beyond one parameter larger than that): fewer reads save
# about 10 ms each, which a larger batch no longer buys back.
BATCH_BYTES = 2**30
# The folder writer's staging buffers: two for the file being written.
_WRITER_BYTES = 2 * STAGE_BYTES


@dataclass(frozen=True)
class _Need:
    """What converting one parameter holds: the whole parameter, each saved chunk read for it, a tensor cast before writing."""

    entry: PlanEntry
    parameter: int
    reads: tuple[int, ...]  # bytes of each saved chunk its reads load (torch.load loads a saved chunk whole)
    cast: int  # the largest of its HF tensors written in another dtype than the parameter's (a cast copy) or encoded, or 0


def _needs(
    plan: TransferPlan, entries: list[PlanEntry], chunks: dict[str, list[ShardedTensor]], metadata: Metadata, pick, encoding=None
) -> list[_Need]:
    """Each parameter's ``_Need``, from the checkpoint's metadata (its saved chunks), the export's dtypes and its
    ``encoding`` (what quantizing a tensor holds counts as a cast copy)."""
    saved = _SavedChunks(metadata)
    needs = []
    for entry in entries:
        reads = tuple(size for sh in chunks[entry.name] for size in saved.read_for(sh))
        exported = plan.meta_export(entry).items()
        casts = [t.numel() * pick(name, t.dtype).itemsize for name, t in exported if pick(name, t.dtype) != t.dtype]
        if encoding is not None:
            casts += [encoding.working_bytes(name, t.to(pick(name, t.dtype))) for name, t in exported]
        needs.append(_Need(entry, tensor_bytes(entry.local_shape, entry.dtype), reads, max(casts, default=0)))
    return needs


class _SavedChunks:
    """The chunks a checkpoint saved of each tensor, found by the region a read covers.

    A key of stacked layers or experts is saved as one chunk per layer (or expert): chunks are
    grouped by their offsets along such leading axes (``prepend_axis_num``, one element wide), so
    that each region is checked against its own layer's chunks rather than every layer's.
    """

    def __init__(self, metadata: Metadata):
        self.metadata = metadata
        self._groups: dict[tuple[str, int], dict[tuple[int, ...], list[ChunkStorageMetadata]]] = {}

    def read_for(self, sh: ShardedTensor) -> list[int]:
        """Bytes of each saved chunk of ``sh.key`` that overlaps ``sh``'s region (each is loaded whole to read the overlap)."""
        saved = self.metadata.state_dict_metadata[sh.key]
        lead = sh.prepend_axis_num
        start, size = tuple(sh.global_offset), (1,) * lead + tuple(sh.local_shape)
        groups = self._groups.get((sh.key, lead))
        if groups is None:
            groups = self._groups[(sh.key, lead)] = {}
            for chunk in saved.chunks:
                one_wide = all(length == 1 for length in chunk.sizes[:lead])
                groups.setdefault(tuple(chunk.offsets[:lead]) if one_wide else (), []).append(chunk)
        candidates = groups.get(start[:lead], []) + (groups.get((), []) if lead else [])
        return [
            math.prod(chunk.sizes) * saved.properties.dtype.itemsize
            for chunk in candidates
            if all(c < s + n and s < c + m for c, m, s, n in zip(chunk.offsets, chunk.sizes, start, size))
        ]


@dataclass(frozen=True)
class _Batch:
    """What consecutive parameters read together hold at their peak: ``held``."""

    count: int = 0
    parameters: int = 0
    reads: tuple[int, ...] = ()  # the two largest saved chunks read for them
    cast: int = 0

    def plus(self, need: _Need) -> _Batch:
        reads = tuple(heapq.nlargest(2, self.reads + need.reads))
        return _Batch(self.count + 1, self.parameters + need.parameter, reads, max(self.cast, need.cast))

    def held(self) -> list[tuple[str, int]]:
        """(what, bytes): the parameters; either the two largest saved chunks read (torch's reader holds
        the chunk it loaded last while it loads the next) or the largest cast tensor (made after the
        reads, while the parameters not yet written are held); the writer's staging buffers."""
        read = sum(self.reads)
        besides = ("saved chunks being read", read) if read >= self.cast else ("a tensor cast (or quantized) for writing", self.cast)
        parameters = ("the parameter" if self.count == 1 else "the parameters", self.parameters)
        return [parameters, besides, ("the writer's buffers", _WRITER_BYTES)]

    def minimum(self) -> int:
        """The least budget it fits."""
        return streaming.with_margin(sum(size for _, size in self.held()))


class _RegionLoadPlanner(LoadPlanner):
    """Reads given regions of global tensors (sharded key, global offset, tensor to fill) from a torch_dist checkpoint.

    Whatever layout the checkpoint was saved at, DCP's resharding reads the saved chunks that
    overlap each region and copies the overlap in (a saved chunk is loaded whole, and torch's reader
    holds the one it loaded last while it loads the next).
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


def _check_budget(needs: list[_Need], budget: MemoryBudget) -> None:
    """Refuse ``budget`` if the parameter that holds the most, alone, does not fit it; names it and the budget that would do."""
    largest = max(needs, key=lambda need: _Batch().plus(need).minimum())
    alone = _Batch().plus(largest)
    if alone.minimum() > budget.bytes:
        raise streaming.over_budget(largest.entry.name, alone.held(), budget, alone.minimum())


def _batches(needs: list[_Need], budget: int) -> Iterator[list[PlanEntry]]:
    """Consecutive parameters that fit ``budget`` together, and ``BATCH_BYTES`` unless one alone is larger."""
    entries: list[PlanEntry] = []
    batch = _Batch()
    for need in needs:
        grown = batch.plus(need)
        if entries and (grown.minimum() > budget or grown.parameters > BATCH_BYTES):
            yield entries
            entries, grown = [], _Batch().plus(need)
        entries.append(need.entry)
        batch = grown
    if entries:
        yield entries


@frozen_heap()
def export_hf_folder(
    bridge,
    root: str | Path,
    out_dir: str | Path,
    *,
    padded_vocab_size: int,
    iteration: int | None | str = "latest",
    max_memory: MemoryBudget | int | str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    target_dtype: Callable[[str, torch.dtype], torch.dtype] | None = None,
    config: dict,
    side_files: dict[str, Path | str] | None = None,
    check: Callable[[Path], None] | None = None,
    encoding=None,
    carried: Mapping[str, TensorSource] | None = None,
    release: Callable[[], None] | None = None,
) -> tuple[bool, streaming.Streamed]:
    """Stream a Megatron checkpoint (any layout it was saved at) into an HF folder within ``max_memory``; one process.

    ``max_memory``: a size, or None for the default (``bridge.runtime.memory_budget``); a budget
    too small for some parameter is refused before the folder's writer starts.
    ``target_dtype(hf_name, dtype)`` picks each tensor's dtype (default: the model's). The folder
    is written atomically by ``HFFolderWriter``, in shards of at most ``max_shard_size``.
    ``check(folder)`` (transformers' load check) runs before publishing when the weights fit half
    the budget, and is skipped with a warning otherwise. ``encoding``: how tensors are stored
    (``bridge.engine.export.encoded``). ``carried``: tensors written as they are after the model's, each
    read whole (``release``: drop their source's mapped window after each). Returns whether it ran, and
    the budget with the peak measured.
    """
    budget = streaming.budget_of(max_memory)
    pick = target_dtype or (lambda name, dtype: dtype)
    iteration, folder = mc.complete_iteration(root, iteration)
    _, plan, state = meta_model(bridge, padded_vocab_size=padded_vocab_size)
    # Measured from here: the modules imported so far are the program's, not the conversion's.
    with PeakMemory() as peak:
        entries = plan.exported_entries()
        chunks = model_chunks(state)
        missing = [entry.name for entry in entries if not chunks.get(entry.name)]
        if missing:
            raise mc.MegatronCheckpointError(f"parameters with no entry in the model's sharded state dict: {', '.join(missing)}")
        reader = CachedMetadataFileSystemReader(str(folder))  # one read of .metadata for all the batches
        metadata = reader.read_metadata()
        saved = {key: tuple(m.size) for key, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
        mc.check_global_shapes((sh for shards in chunks.values() for sh in shards), saved, root)
        needs = _needs(plan, entries, chunks, metadata, pick, encoding)
        _check_budget(needs, budget)
        params = {name: plan.local[name].param for name in plan.local}
        layout = export_layout(plan, target_dtype, parse_size(max_shard_size), encoding, carried)
        checked: list[Path] = []

        def bounded_check(tmp_dir: Path) -> None:
            if 2 * layout.data_bytes > budget.bytes:  # transformers would hold the whole model (and a copy while loading it)
                logger.warning(
                    "not loading the export in transformers: its %s of weights do not fit %s", size_text(layout.data_bytes), budget.text
                )
                return
            check(tmp_dir)  # type: ignore[misc]
            checked.append(tmp_dir)

        with (
            disk_full_reported(Path(out_dir), layout.file_bytes),
            returned_to_the_os(),
            HFFolderWriter(out_dir, layout, overwrite=overwrite) as writer,
        ):
            with tqdm(total=len(entries), desc="exporting", unit="tensor", delay=2.0) as progress:
                for batch in _batches(needs, budget.bytes):
                    loaded = _read_parameters(reader, batch, chunks, params)
                    for entry in batch:
                        for name, tensor in plan.mapping(entry).megatron_to_hf([loaded.pop(entry.name)], plan.context(entry, 0)).items():
                            for stored, value in encoded(encoding, name, tensor.to(pick(name, tensor.dtype))):
                                writer.add(stored, value)
                        progress.update(1)
                    del loaded
            write_carried(writer, carried or {}, release, encoding)
            writer.finish(config, side_files, check=None if check is None else bounded_check)
    return bool(checked), streaming.Streamed(budget, peak.peak, peak.exact)
