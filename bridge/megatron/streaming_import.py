"""HF safetensors → Megatron-Core dist checkpoint within ``--max-memory``, one parameter at a time; one process.

``megatron.core.dist_checkpointing.save`` writes the TP=PP=1 meta model's state dict (``common.pt``,
``metadata.json`` and the DCP ``.metadata`` exactly as it always does) with a save strategy whose
planner builds each chunk from the HF files through its parameter's mapping (the ``hf_to_megatron``
the in-memory load runs) when torch's serial file writer asks for it, and frees it once written.
What it holds for each parameter (``_held``): the parameter, a part of it written as a tensor of its
own, the pages of its HF tensors mapped (with one window of ``WINDOW_BYTES``) and the decoded copies of
those read through a quantization view (``decode_bytes``: FP8 block-scaled weights); beside the parsed
headers of the HF files. A budget below the largest of those with the margin is refused before
anything is written, naming the parameter and the budget that would do.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType
from tqdm import tqdm

from bridge.engine.plan import PlanEntry, TransferPlan, validate_checkpoint
from bridge.hf.folder import weight_files
from bridge.hf.reader import HEADER_MEMORY_FACTOR, SafetensorsReader, header_bytes
from bridge.hf.weight_values import NonFinite, nonfinite_counts
from bridge.mappings import MappingError
from bridge.megatron import checkpoint as mc
from bridge.megatron.streaming import (
    MemoryBudgetError,
    MiB,
    Streamed,
    budget_of,
    meta_model,
    model_chunks,
    over_budget,
    region,
    returned_to_the_os,
    size_arg,
    tensor_bytes,
    with_margin,
)
from bridge.runtime.gc_freeze import frozen_heap
from bridge.runtime.memory_budget import MemoryBudget
from bridge.runtime.peak_memory import PeakMemory
from bridge.runtime.write_errors import size_text

logger = logging.getLogger(__name__)

# The window of the HF files mapped at a time (``SafetensorsReader``'s ``reopen_bytes``): tensors
# smaller than it share one; a larger one is mapped just for its read. Every page is faulted in once
# either way, and a file page is mapped again by its own fault-around, so a small window costs no time.
WINDOW_BYTES = 8 * MiB


def _header_memory(folder: Path, budget: MemoryBudget) -> int:
    """Memory the HF files' headers take once parsed (the readers keep them), from their lengths alone.

    Headers that alone would not fit the budget are refused before any is parsed (with a lower bound
    of the budget the conversion needs: the parameters are counted once the headers are parsed).
    """
    lengths = {path: header_bytes(path) for path in weight_files(folder)}
    memory = HEADER_MEMORY_FACTOR * sum(lengths.values())
    minimum = with_margin(memory + WINDOW_BYTES)
    if memory > budget.bytes:
        largest = max(lengths, key=lengths.__getitem__)
        raise MemoryBudgetError(
            f"the safetensors headers of {folder} take about {size_text(memory)} of memory once parsed ({largest.name}'s header "
            f"alone is {lengths[largest]:,} bytes), more than {budget.text} allows beside the conversion; "
            f"raise --max-memory to at least {size_arg(minimum)}"
        )
    return memory


def _held(plan: TransferPlan, entry: PlanEntry, reader: SafetensorsReader, chunks: list[ShardedTensor]) -> list[tuple[str, int]]:
    """What is held at once while ``entry`` is built and written, as (what, bytes).

    The parameter; the largest part of it written as a tensor of its own (a clone: torch's writer
    saves a tensor's whole storage); the HF files' mapped pages: its HF tensors (views of each stay
    mapped until it is built) and the window mapped before them, whose pages other tensors touched.
    """
    whole = tensor_bytes(entry.local_shape, entry.dtype)
    parts = [sh.data.numel() * entry.dtype.itemsize for sh in chunks if tuple(sh.data.shape) != tuple(entry.local_shape)]
    mapped = sum(reader.lazy(name).nbytes for name in plan.mapping(entry).hf_names) + WINDOW_BYTES
    # A quantized HF tensor read through a view (FP8 blocks) comes as a decoded copy, made with temporaries of its own.
    decoded = sum(getattr(reader.lazy(name), "decode_bytes", 0) for name in plan.mapping(entry).hf_names)
    held = [("the parameter", whole), ("a part of it written on its own", max(parts, default=0)), ("the HF files' mapped pages", mapped)]
    return held + ([("its quantized HF tensors decoded", decoded)] if decoded else [])


class _HFSource:
    """Builds one TP=1 parameter at a time from the HF files, counting the NaN/Inf of each HF tensor it reads.

    Its reader maps windows of at most ``reopen_bytes`` of the files (or one read, when longer), so
    that their resident pages stay within that share of the budget (see ``SafetensorsReader``).
    Counting reads each tensor in small blocks just before it is built, while its pages are being
    faulted in anyway.
    """

    def __init__(self, bridge, plan: TransferPlan, reopen_bytes: int, nonfinite: dict[str, NonFinite]):
        self.plan = plan
        self.reader = SafetensorsReader(bridge.hf_folder, bridge.reader_views, reopen_bytes=reopen_bytes)
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
        chunk = region(full, view, param)
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
                self.source.reader.release()  # the window mapped last (its pages would stay resident with the reader)


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


def _check_budget(plan: TransferPlan, reader: SafetensorsReader, state: dict, headers: int, budget: MemoryBudget) -> None:
    """Refuse ``budget`` if the parameter that holds the most does not fit it beside the parsed headers, naming both."""
    chunks = model_chunks(state)
    headers_held = ("the parsed headers", headers)
    held = {entry.name: [*_held(plan, entry, reader, chunks.get(entry.name, [])), headers_held] for entry in plan.entries}
    largest = max(plan.entries, key=lambda entry: sum(size for _, size in held[entry.name]))
    need = sum(size for _, size in held[largest.name])
    if with_margin(need) > budget.bytes:
        what = f"{largest.name} (from {', '.join(plan.mapping(largest).hf_names)})"
        raise over_budget(what, held[largest.name], budget, with_margin(need))


@frozen_heap()
def import_checkpoint(
    bridge,
    root: str | Path,
    *,
    max_memory: MemoryBudget | int | str | None = None,
    vocab_divisible_by: int = 128,
    nonfinite: dict[str, NonFinite] | None = None,
) -> tuple[int, Streamed]:
    """Write ``bridge``'s HF checkpoint as a Megatron-LM checkpoint at ``root`` (iteration "release") within ``max_memory``.

    ``max_memory``: a size, or None for the default (``bridge.runtime.memory_budget``). A budget
    too small for some parameter is refused before ``root`` is created. ``vocab_divisible_by`` is
    Megatron-LM's ``make_vocab_size_divisible_by`` × the TP size the checkpoint is meant for, so
    that the padded vocabulary is the one that layout would have. ``nonfinite``, when given,
    receives the NaN/Inf counts of the HF tensors that hold any, counted as they stream. One
    process; returns the padded vocabulary size and the budget with the peak measured.
    """
    budget = budget_of(max_memory)
    headers = _header_memory(Path(bridge.hf_folder), budget)  # before any header is parsed
    model, plan, state = meta_model(bridge, vocab_divisible_by=vocab_divisible_by)
    validate_checkpoint(plan, bridge.reader, bridge.model_bridge.hf_ignore, bridge.model_bridge.hf_carried)
    _check_budget(plan, bridge.reader, state, headers, budget)
    params = {entry.name: (entry, plan.local[entry.name].param) for entry in plan.entries}
    state.update(checkpoint_version=3.0, iteration=0)  # as Megatron-LM's save_checkpoint stores them
    folder = mc.iteration_dir(root, None)
    # Measured from here: the modules imported so far are the program's, not the conversion's.
    with PeakMemory() as peak:
        folder.mkdir(parents=True, exist_ok=True)
        mc.check_writer_dependencies()
        with returned_to_the_os():
            strategy = _StreamingSaveStrategy(params, _HFSource(bridge, plan, WINDOW_BYTES, {} if nonfinite is None else nonfinite))
            needed = sum(tensor_bytes(entry.local_shape, entry.dtype) for entry in plan.entries)
            mc.save_dist_checkpoint(state, folder, strategy, needed=needed)
        mc.write_tracker(root, None)
    streamed = Streamed(budget, peak.peak, peak.exact)
    logger.info("saved Megatron checkpoint %s (streamed, %s)", folder, streamed.text())
    return model[0].vocab_size, streamed
