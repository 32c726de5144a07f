"""HF ⇄ Megatron-Core distributed checkpoint in bounded memory: one tensor at a time, never the whole model.

A dist checkpoint's content does not depend on TP/PP: its sharded keys and global shapes are the
same at every layout. So one process builds the TP=PP=1 model on the ``meta`` device (names, global
shapes, dtypes, Megatron's own ``sharded_state_dict()``, nothing allocated) and:

* import: ``megatron.core.dist_checkpointing.save`` writes that state dict (``common.pt``,
  ``metadata.json`` and the DCP ``.metadata`` exactly as it always does) with a save strategy whose
  planner materialises each chunk on demand from the HF safetensors through the parameter's mapping
  (the same ``hf_to_megatron`` the in-memory load runs), hands it to torch's serial file writer, and
  frees it once written. Megatron's own writer cannot be used: it resolves every tensor up front.
* export: ``dist_checkpointing.load`` reads a few parameters at a time (as many as fit the budget),
  each goes through ``megatron_to_hf`` and into ``HFFolderWriter``, and is dropped.

Peak memory is then about the largest parameter (a few copies of it while converting) plus the HF
writer's shard buffer, whatever the model size. ``max_memory`` bounds what the conversion itself
adds: the shard buffer is capped to fit, a parameter that cannot be converted within the budget is
refused before anything is written, and the HF files are mapped a window of a quarter of the budget
at a time, so that their memory-mapped pages (which count as resident memory) stay within the budget
too, however large a shard is. Their parsed headers count against it as well: headers too large for
it are refused before any is parsed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed.checkpoint
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import CachedMetadataFileSystemReader
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from tqdm import tqdm

from bridge.engine.plan import PlanEntry, TransferPlan, validate_checkpoint
from bridge.hf.reader import HEADER_MEMORY_FACTOR, NonFinite, SafetensorsReader, header_bytes, nonfinite_counts, weight_files
from bridge.hf.writer import HFFolderWriter, parse_size
from bridge.mappings import MappingError
from bridge.megatron import checkpoint as mc
from bridge.runtime.gc_freeze import frozen_heap
from bridge.runtime.write_errors import disk_full_reported
from bridge.runtime.write_errors import size_text as _size_text

logger = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY = "4GB"
# Share of the budget the mapped window of the HF files may take (import): 1/_MAPPED_SHARE.
_MAPPED_SHARE = 4
# Share of the budget the HF writer's shard buffer may take (export): 1/_SHARD_SHARE.
_SHARD_SHARE = 4
# Share of the budget left to the export's bookkeeping (model metadata, DCP plans) and allocator slack.
_SLACK_SHARE = 4


class MemoryBudgetError(ValueError):
    """A tensor cannot be converted within ``--max-memory``."""


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


@contextlib.contextmanager
def _returned_to_the_os() -> Iterator[None]:
    """Make glibc hand large freed blocks back to the OS at once while streaming.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), after
    which blocks of that size come from the heap and stay resident after ``free``: a stream of
    tensors would then hold on to memory it no longer uses. A fixed 1 MiB threshold (and trim
    threshold) keeps resident memory close to what is in use. glibc cannot go back to its dynamic
    threshold, so the setting stays for the rest of the process (a one-shot conversion command).
    No-op where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (glibc only)
    except (OSError, AttributeError):
        yield
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_trim_threshold, 1 << 20)
    yield


# ---------------------------------------------------------------- the model, on the meta device


def meta_model(bridge, padded_vocab_size: int | None = None, vocab_divisible_by: int = 128) -> tuple[list, TransferPlan, dict]:
    """The TP=PP=1 model on the meta device, its transfer plan and its Megatron-LM state dict.

    ``padded_vocab_size`` (an existing checkpoint's) wins over ``vocab_divisible_by``.
    """
    with torch.device("meta"):
        model = bridge.to_megatron_model(
            tp=1, pp=1, load_weights=False, make_vocab_size_divisible_by=vocab_divisible_by, padded_vocab_size=padded_vocab_size
        )
    return model, bridge.plan(model), mc.model_state_dict(model)


def _entries_by_name(plan: TransferPlan) -> dict[str, PlanEntry]:
    return {entry.name: entry for entry in plan.entries}


# ---------------------------------------------------------------- import


def _import_budget(need: int) -> int:
    """The smallest ``--max-memory`` whose share beside the HF files' mapped pages is ``need``."""
    return need * _MAPPED_SHARE // (_MAPPED_SHARE - 1) + 1


def _header_memory(folder: Path, budget: int) -> int:
    """Memory the HF files' headers take once parsed (the readers keep them), from their lengths alone.

    Headers that would not fit what the budget leaves beside the mapped pages are refused before any is parsed.
    """
    lengths = {path: header_bytes(path) for path in weight_files(folder)}
    memory = HEADER_MEMORY_FACTOR * sum(lengths.values())
    if memory > budget - budget // _MAPPED_SHARE:
        largest = max(lengths, key=lengths.__getitem__)
        raise MemoryBudgetError(
            f"the safetensors headers of {folder} take about {_size_text(memory)} of memory once parsed ({largest.name}'s header "
            f"alone is {lengths[largest]:,} bytes), more than --max-memory {_size_text(budget)} leaves for the conversion; "
            f"raise --max-memory to at least {_size_text(_import_budget(memory))}"
        )
    return memory


def _hf_bytes(plan: TransferPlan, entry: PlanEntry, reader: SafetensorsReader) -> int:
    return sum(reader.lazy(name).nbytes for name in plan.mapping(entry).hf_names)


class _HFSource:
    """Builds one TP=1 parameter at a time from the HF files, counting the NaN/Inf of each HF tensor it reads.

    Its reader maps windows of at most ``reopen_bytes`` of the files (or one read, when longer), so
    that their resident pages stay within that share of the budget (see ``SafetensorsReader``).
    Counting reads each tensor in small blocks just before it is built, while its pages are being
    faulted in anyway.
    """

    def __init__(self, bridge, plan: TransferPlan, reopen_bytes: int, nonfinite: dict[str, NonFinite]):
        self.plan = plan
        self.reader = SafetensorsReader(bridge.hf_folder, bridge.model_bridge.hf_views, reopen_bytes=reopen_bytes)
        self.nonfinite = nonfinite
        self._counted: set[str] = set()

    def build(self, entry: PlanEntry) -> torch.Tensor:
        mapping = self.plan.mapping(entry)
        fresh = [name for name in mapping.hf_names if name not in self._counted]
        self._counted.update(fresh)
        self.nonfinite.update(nonfinite_counts(self.reader, fresh))
        sources = {role: self.reader.lazy(name) for role, name in mapping.hf_param.items()}
        # A tensor of its own (not a view of the reader's maps), so that it can be freed after writing.
        return mapping.hf_to_megatron(sources, self.plan.context(entry), out=torch.empty(entry.local_shape, dtype=entry.dtype))


class _MaterialisingPlanner(MCoreSavePlanner):
    """Megatron's save planner, but each tensor chunk is built when the writer asks for it, then freed.

    ``chunks`` maps a write item's (sharded key, global offset) to the parameter it is part of and
    the meta view of that part. torch's file writer keeps a reference to every tensor it wrote
    until the file is closed (for its safetensors format), so the storage of the chunk written
    last is released when the next one is asked for: the writer is serial, so it is done with it.
    """

    def __init__(
        self, chunks: dict[tuple[str, tuple[int, ...]], tuple[PlanEntry, torch.Tensor, torch.Tensor]], source: _HFSource, progress: tqdm
    ):
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self.chunks, self.source, self.progress = chunks, source, progress
        self._param: tuple[str, torch.Tensor] | None = None  # the parameter the last chunk came from
        self._written: torch.Tensor | None = None

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        self.release()
        entry, view, param = self.chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        if self._param is None or self._param[0] != entry.name:
            self._param = None
            self._param = (entry.name, self.source.build(entry))
        full = self._param[1]
        chunk = _region(full, view, param)
        if chunk is not full:  # a part of the parameter (gate or up of a fused fc1): a tensor of its own, to be freed
            chunk = chunk.clone()
        self._written = chunk.view(write_item.tensor_data.chunk.sizes)
        self.progress.update(1)
        return self._written

    def release(self) -> None:
        """Free the chunk written last (and the parameter, if that chunk was all of it)."""
        if self._written is None:
            return
        storage = self._written.untyped_storage()
        if self._param is not None and self._param[1].untyped_storage().data_ptr() == storage.data_ptr():
            self._param = None
        self._written = None
        storage.resize_(0)


class _StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """The torch_dist format (what ``dist_checkpointing.load`` reads), written by torch's serial file writer."""

    def __init__(self, params: dict[str, tuple[PlanEntry, torch.Tensor]], source: _HFSource):
        super().__init__("torch_dist", 1, thread_count=1)
        self.params, self.source = params, source

    def save(self, sharded_state_dict: dict, checkpoint_dir: Path) -> None:
        chunks = _chunk_index(sharded_state_dict, self.params)
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
        # One file, written by this thread; nothing copied ahead (per_thread_copy_ahead=0 keeps the serial loader on GPUs too).
        writer = FileSystemWriter(checkpoint_dir, single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0)
        with tqdm(total=len(chunks), desc="writing Megatron checkpoint", unit="tensor", delay=2.0) as progress:
            planner = _MaterialisingPlanner(chunks, self.source, progress)
            try:
                # no_dist (one process anyway): a failure is not pickled between ranks, which would drop its
                # cause, e.g. the OSError of a full disk under torch.save's "unexpected pos 704 vs 598".
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    torch.distributed.checkpoint.save(pyt_state_dict, storage_writer=writer, planner=planner, no_dist=True)
            finally:
                planner.release()


def _chunk_index(sharded_state_dict: dict, params: dict[str, tuple[PlanEntry, torch.Tensor]]) -> dict:
    """(sharded key, global offset) → (plan entry, meta view of the chunk, meta parameter) for every tensor chunk.

    Factories (the fused fc1) are already built by dist_checkpointing here; their chunks sit under
    the state-dict key of the parameter they are views of.
    """
    index = {}
    for model_key, model_dict in sharded_state_dict.items():
        if not isinstance(model_dict, dict):
            continue
        for key, value in model_dict.items():
            for sh in nested_values({key: value}):
                if not isinstance(sh, ShardedTensor):
                    continue
                if key not in params:
                    raise MappingError(
                        f"the Megatron state dict entry {model_key}.{key} (sharded key {sh.key}) is not a parameter any mapping covers"
                    )
                entry, param = params[key]
                index[(sh.key, tuple(sh.global_offset))] = (entry, sh.data, param)
    return index


@frozen_heap()
def import_checkpoint(
    bridge,
    root: str | Path,
    *,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    vocab_divisible_by: int = 128,
    nonfinite: dict[str, NonFinite] | None = None,
) -> int:
    """Write ``bridge``'s HF checkpoint as a Megatron-LM checkpoint at ``root`` (iteration "release") within ``max_memory``.

    ``vocab_divisible_by`` is Megatron-LM's ``make_vocab_size_divisible_by`` × the TP size the
    checkpoint is meant for, so that the padded vocabulary is the one that layout would have.
    ``nonfinite``, when given, receives the NaN/Inf counts of the HF tensors that hold any, counted
    as they stream. One process; returns the padded vocabulary size.
    """
    budget = parse_size(max_memory)
    reopen = budget // _MAPPED_SHARE
    headers = _header_memory(Path(bridge.hf_folder), budget)  # before any header is parsed
    model, plan, state = meta_model(bridge, vocab_divisible_by=vocab_divisible_by)
    validate_checkpoint(plan, bridge.reader, bridge.model_bridge.hf_ignore)
    room = budget - reopen - headers
    for entry in plan.entries:
        need = 2 * (_hf_bytes(plan, entry, bridge.reader) + _nbytes(entry.local_shape, entry.dtype))
        if need > room:
            raise MemoryBudgetError(
                f"{entry.name} (from {', '.join(plan.mapping(entry).hf_names)}) needs about {_size_text(need)} to convert, but "
                f"--max-memory {_size_text(budget)} leaves {_size_text(room)} for it (1/{_MAPPED_SHARE} goes to the HF files' "
                f"mapped pages, {_size_text(headers)} to their parsed headers); "
                f"raise --max-memory to at least {_size_text(_import_budget(need + headers))}"
            )
    params = {name: (entry, plan.local[name].param) for name, entry in _entries_by_name(plan).items()}
    state.update(checkpoint_version=3.0, iteration=0)  # as Megatron-LM's save_checkpoint stores them
    folder = mc.iteration_dir(root, None)
    folder.mkdir(parents=True, exist_ok=True)
    mc.check_writer_dependencies()
    with _returned_to_the_os():
        strategy = _StreamingSaveStrategy(params, _HFSource(bridge, plan, reopen, {} if nonfinite is None else nonfinite))
        mc.save_dist_checkpoint(state, folder, strategy, needed=sum(_nbytes(entry.local_shape, entry.dtype) for entry in plan.entries))
    mc.write_tracker(root, None)
    logger.info("saved Megatron checkpoint %s (streamed, --max-memory %s)", folder, _size_text(budget))
    return model[0].vocab_size


# ---------------------------------------------------------------- export


def _parameter_chunks(model_dict: dict) -> dict[str, list[ShardedTensor]]:
    """State-dict key → the ShardedTensors it is saved as (factories built; their data are meta views of the parameter)."""
    built = dict(model_dict)  # apply_factories replaces entries of this copy, not of the model's state dict
    apply_factories(built)
    return {key: [sh for sh in nested_values({key: value}) if isinstance(sh, ShardedTensor)] for key, value in built.items()}


def _region(full: torch.Tensor, view: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (a real, contiguous copy of ``param``) that the meta ``view`` of ``param`` covers."""
    if view.shape == param.shape and view.storage_offset() == param.storage_offset():
        return full
    return full.as_strided(view.shape, view.stride(), full.storage_offset() + view.storage_offset() - param.storage_offset())


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
            region = _region(full, sh.data, params[entry.name])
            targets[(sh.key, tuple(sh.global_offset))] = region.view((1,) * sh.prepend_axis_num + tuple(sh.local_shape))
    torch.distributed.checkpoint.load({}, storage_reader=reader, planner=_RegionLoadPlanner(targets), no_dist=True)
    return fulls


def _batches(entries: list[PlanEntry], room: int) -> Iterator[list[PlanEntry]]:
    """Consecutive entries whose conversion (about three copies of each) fits ``room`` together."""
    batch: list[PlanEntry] = []
    used = 0
    for entry in entries:
        need = 3 * _nbytes(entry.local_shape, entry.dtype)
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
    is written atomically by ``HFFolderWriter``, whose shard buffer is capped to a quarter of the budget.
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
    entries = [entry for entry in plan.entries if not plan.mapping(entry).load_only]
    room = budget - shard - budget // _SLACK_SHARE
    for entry in entries:
        need = 3 * _nbytes(entry.local_shape, entry.dtype)
        if need > room:
            raise MemoryBudgetError(
                f"{entry.name} needs about {_size_text(need)} to convert, but --max-memory {_size_text(budget)} leaves "
                f"{_size_text(room)} for it beside the {_size_text(shard)} shard buffer and bookkeeping; raise --max-memory to at least "
                f"{_size_text(2 * need + 1)}"
            )
    (model_key,) = [key for key, value in state.items() if isinstance(value, dict)]
    chunks = _parameter_chunks(state[model_key])
    reader = CachedMetadataFileSystemReader(str(folder))  # one read of .metadata for all the batches
    check_global_shapes(chunks, reader.read_metadata(), folder)
    params = {name: plan.local[name].param for name in plan.local}
    missing = [entry.name for entry in entries if not chunks.get(entry.name)]
    if missing:
        raise mc.MegatronCheckpointError(f"parameters with no entry in the model's sharded state dict: {', '.join(missing)}")
    written = 0

    def bounded_check(tmp_dir: Path) -> None:
        if 2 * written > budget:  # transformers would hold the whole model (and a copy while loading it)
            logger.warning(
                "not loading the export in transformers: its %s of weights do not fit --max-memory %s",
                _size_text(written),
                _size_text(budget),
            )
            return
        check(tmp_dir)  # type: ignore[misc]
        checked.append(tmp_dir)

    checked: list[Path] = []
    needed = sum(t.to(t.dtype if target_dtype is None else target_dtype(name, t.dtype)).nbytes for name, t in plan.exported_meta())
    with (
        disk_full_reported(Path(out_dir), needed),
        _returned_to_the_os(),
        HFFolderWriter(out_dir, max_shard_size=shard, overwrite=overwrite) as writer,
    ):
        with tqdm(total=len(entries), desc="exporting", unit="tensor", delay=2.0) as progress:
            for batch in _batches(entries, room):
                loaded = _read_parameters(reader, batch, chunks, params)
                for entry in batch:
                    for name, tensor in plan.mapping(entry).megatron_to_hf([loaded.pop(entry.name)], plan.context(entry, 0)).items():
                        tensor = tensor if target_dtype is None else tensor.to(target_dtype(name, tensor.dtype))
                        written += tensor.nbytes
                        writer.add(name, tensor)
                    progress.update(1)
                del loaded
        writer.finish(config, side_files, check=None if check is None else bounded_check)
    return bool(checked)
