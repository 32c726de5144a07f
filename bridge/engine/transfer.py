"""The streaming transfer engine: parameters move one at a time, in one global order all ranks agree on.

``TransferPlan`` lists every Megatron parameter of the whole model (all PP stages and virtual
stages) with its owner, local shape, dtype and mapping. Load: each rank builds its own shards from
the HF tensors (reading only its slice, or one reader per TP group that scatters); each PP stage
loads only its own layers. Export: each parameter has one writing rank (rank 0, or one of the ranks
holding its shards, see ``TransferPlan.assign_writers``); the other holders send it their shards,
and it turns them back into HF tensors and yields them. A parameter whose HF tensors are joins along
dim 0 of its shards may instead be ``COWRITTEN``: no shard moves, and each holder gets the HF
tensors with its own parts real and the others' as meta tensors, to write its parts in place.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from dataclasses import dataclass, replace
from typing import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from bridge.engine.device_upload import PinnedUpload
from bridge.runtime.gc_freeze import frozen_heap
from bridge.hf.reader import CheckpointError, NonFinite, SafetensorsReader, non_float_weights, nonfinite_counts
from bridge.mappings import AutoMapping, JoinedShards, MappingContext, MappingError, MappingRegistry, ParamMapping, RowCopy, materialize

logger = logging.getLogger(__name__)

LOAD_STRATEGIES = ("slice", "scatter")
COWRITTEN = -1  # the writer of a parameter that each holder of its shards writes itself (``TransferPlan.assign_writers``)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
# How validation and ``hfmb plan`` name tensors stored in a dtype that is not a float weight's (``non_float_weights``).
NOT_FLOAT = (
    "tensors not stored as float weights (float32, bfloat16, float16 or float64; the bridge does not cast them, "
    "and quantized checkpoints are not supported)"
)


@dataclass(frozen=True)
class PlanEntry:
    """One Megatron parameter of the whole model, as every rank sees it."""

    name: str  # global name: layer and expert numbers counted over the whole model
    kind: str  # the concrete mapping kind (an AutoMapping is resolved on the owning rank)
    local_shape: tuple[int, ...]
    dtype: torch.dtype
    pp_rank: int
    vp_stage: int
    expert: bool  # sharded over expert-TP (ETP) and placed by EP, instead of TP
    owner: int  # global rank that speaks for this parameter: TP (ETP) rank 0 of data-parallel replica 0
    group: tuple[int, ...]  # global ranks of the owner's TP (ETP) group, in TP-rank order: the shards' holders


@dataclass
class LocalParam:
    chunk: int
    local_name: str
    param: torch.nn.Parameter


def unwrap_chunks(model) -> list[torch.nn.Module]:
    """The ``GPTModel`` chunks inside a model list (or a single model), through DDP/Float16Module wrappers."""
    from megatron.core.models.gpt import GPTModel

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    unwrapped = []
    for chunk in chunks:
        while not isinstance(chunk, GPTModel) and hasattr(chunk, "module"):
            chunk = chunk.module
        if not isinstance(chunk, GPTModel):
            raise TypeError(f"expected Megatron-Core GPTModel chunks, got {type(chunk).__name__}")
        unwrapped.append(chunk)
    return unwrapped


def global_names(chunk: torch.nn.Module) -> dict[str, str]:
    """Local parameter name → global name: layers counted over all PP/VPP stages, experts over all EP ranks.

    This is the one place where local layer and expert numbers become global ones.
    """
    layer_numbers = [layer.layer_number - 1 for layer in chunk.decoder.layers] if hasattr(chunk, "decoder") else []
    experts = chunk.config.num_moe_experts or 0
    local_experts = experts // parallel_state.get_expert_model_parallel_world_size() if experts else 0
    expert_offset = parallel_state.get_expert_model_parallel_rank() * local_experts

    def rename(name: str) -> str:
        match = _LAYER.match(name)
        if match is not None:
            name = f"decoder.layers.{layer_numbers[int(match.group(1))]}." + name[match.end():]
        return _LOCAL_EXPERT.sub(lambda m: f".local_experts.{int(m.group(1)) + expert_offset}.", name)

    return {name: rename(name) for name, _ in chunk.named_parameters()}


def is_expert_param(module: torch.nn.Module, param: torch.nn.Parameter) -> bool:
    """Routed-expert weights: Megatron marks their modules ``is_expert`` (and, at EP > 1, the params ``allreduce=False``)."""
    return bool(getattr(module, "is_expert", False)) or not getattr(param, "allreduce", True)


def _tp_group(expert: bool):
    """This rank's TP group, or its expert-TP group for routed-expert weights."""
    return parallel_state.get_expert_tensor_parallel_group() if expert else parallel_state.get_tensor_model_parallel_group()


def _is_source(expert: bool) -> bool:
    """Whether this rank speaks for its parameters: TP (ETP) rank 0 of data-parallel (expert-DP) replica 0."""
    if expert:
        return parallel_state.get_expert_tensor_parallel_rank() == 0 and parallel_state.get_expert_data_parallel_rank() == 0
    return parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0


class TransferPlan:
    """Every parameter of the model in global order, with its mapping; built collectively by all ranks."""

    def __init__(self, entries: list[PlanEntry], registry: MappingRegistry, local: dict[str, LocalParam], ctx: MappingContext, expert_ctx: MappingContext):
        self.entries = entries
        self.registry = registry
        self.local = local
        self.ctx = ctx
        self.expert_ctx = expert_ctx
        self._mappings: dict[str, ParamMapping] = {}
        self._meta_exports: dict[str, tuple[list[torch.Tensor], dict[str, torch.Tensor | JoinedShards]]] = {}

    @classmethod
    def build(cls, model, registry: MappingRegistry, hf_vocab_size: int) -> "TransferPlan":
        chunks = unwrap_chunks(model)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        rank = dist.get_rank()
        local: dict[str, LocalParam] = {}
        mine: list[PlanEntry] = []
        unmapped: list[str] = []
        for index, chunk in enumerate(chunks):
            vp_stage = getattr(chunk, "vp_stage", None) or 0
            names = global_names(chunk)
            for local_name, param in chunk.named_parameters():
                name = names[local_name]
                mapping = registry.find(name)
                if mapping is None:
                    unmapped.append(name)
                    continue
                module = chunk.get_submodule(local_name.rpartition(".")[0])
                kind = AutoMapping.kind_for(module, param) if isinstance(mapping, AutoMapping) else mapping.kind
                expert = is_expert_param(module, param)
                local[name] = LocalParam(index, local_name, param)
                if _is_source(expert):
                    group = tuple(dist.get_process_group_ranks(_tp_group(expert)))
                    mine.append(PlanEntry(name, kind, tuple(param.shape), param.dtype, pp_rank, vp_stage, expert, rank, group))
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (mine, unmapped))
        all_unmapped = sorted({name for _, names in gathered for name in names})
        if all_unmapped:
            raise MappingError(f"Megatron parameters with no mapping: {', '.join(all_unmapped)}")
        entries = {entry.name: entry for found, _ in gathered for entry in found}
        order = {name: i for i, name in enumerate(entries)}
        ordered = sorted(entries.values(), key=lambda e: (e.vp_stage, e.pp_rank, order[e.name]))
        config = chunks[0].config
        ctx = MappingContext(
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp_size=parallel_state.get_tensor_model_parallel_world_size(),
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_query_groups or config.num_attention_heads,
            head_dim=config.kv_channels,
            vocab_size=hf_vocab_size,
            padded_vocab_size=chunks[0].vocab_size,
        )
        expert_ctx = replace(
            ctx,
            tp_rank=parallel_state.get_expert_tensor_parallel_rank(),
            tp_size=parallel_state.get_expert_tensor_parallel_world_size(),
        )
        return cls(ordered, registry, local, ctx, expert_ctx)

    def mapping(self, entry: PlanEntry) -> ParamMapping:
        if entry.name not in self._mappings:
            mapping = self.registry.resolve(entry.name)
            if isinstance(mapping, AutoMapping):
                mapping = mapping.specialize(entry.kind)
            self._mappings[entry.name] = mapping
        return self._mappings[entry.name]

    def context(self, entry: PlanEntry, tp_rank: int | None = None) -> MappingContext:
        """The mapping context of ``entry`` on this rank (or as TP rank ``tp_rank`` of its group)."""
        ctx = self.expert_ctx if entry.expert else self.ctx
        return ctx if tp_rank is None else replace(ctx, tp_rank=tp_rank)

    def shard_count(self, entry: PlanEntry) -> int:
        return self.context(entry).tp_size if self.mapping(entry).tp_sharded else 1

    def expected_hf_shapes(self) -> dict[str, torch.Size]:
        """HF name → shape the model needs, computed by running every mapping's export on meta tensors."""
        expected: dict[str, torch.Size] = {}
        for entry in self.entries:
            for name, tensor in self.meta_export(entry).items():
                if expected.setdefault(name, tensor.shape) != tensor.shape:
                    raise MappingError(f"{name} is needed with shapes {list(expected[name])} and {list(tensor.shape)}")
        return expected

    def meta_export(self, entry: PlanEntry) -> dict[str, torch.Tensor | JoinedShards]:
        """What export makes of ``entry``, on meta tensors: names, shapes, dtypes and how it is joined."""
        return self._traced_meta_export(entry)[1]

    def _traced_meta_export(self, entry: PlanEntry) -> tuple[list[torch.Tensor], dict[str, torch.Tensor | JoinedShards]]:
        """``entry``'s export of one meta tensor per shard, with those shards (to trace parts back to them); made once per plan."""
        found = self._meta_exports.get(entry.name)
        if found is None:
            shards = [_meta_shard(entry) for _ in range(self.shard_count(entry))]
            found = self._meta_exports[entry.name] = (shards, self.mapping(entry).megatron_to_hf(shards, self.context(entry, 0)))
        return found

    def exported_meta(self) -> list[tuple[str, torch.Tensor | JoinedShards]]:
        """Every HF tensor export writes, in the order it writes them, as meta tensors."""
        return [item for entry in self.exported_entries() for item in self.meta_export(entry).items()]

    def cowritable(self, entry: PlanEntry) -> bool:
        """Whether each holder can write its own shard's bytes of ``entry``'s HF tensors where they belong, with no transfer.

        True when every HF tensor made of it is a join along dim 0 of parts that each come from one
        shard (column-parallel, QKV, gate/up, vocab), found by exporting meta shards and tracing each
        part back to the shard it is a view of; a join along dim 1 (row-parallel) interleaves the
        shards' bytes and is not.
        """
        if self.shard_count(entry) < 2:
            return False
        shards, exported = self._traced_meta_export(entry)
        for tensor in exported.values():
            if isinstance(tensor, JoinedShards) and tensor.dim != 0:
                return False
            parts = tensor.parts if isinstance(tensor, JoinedShards) else [tensor]
            if not all(any(part is shard or part._base is shard for shard in shards) for part in parts):
                return False
        return True

    def local_entries(self) -> list[PlanEntry]:
        return [entry for entry in self.entries if entry.name in self.local]

    def exported_entries(self) -> list[PlanEntry]:
        """The parameters export writes (a load-only mapping's tensor is rebuilt by another mapping)."""
        return [entry for entry in self.entries if not self.mapping(entry).load_only]

    def shard_holders(self, entry: PlanEntry) -> tuple[int, ...]:
        """Global ranks whose tensors make up ``entry``: its TP group when TP-sharded, else the owner alone."""
        return entry.group if self.shard_count(entry) > 1 else (entry.owner,)

    def full_bytes(self, entry: PlanEntry) -> int:
        """Bytes of the whole parameter (all its shards)."""
        return _shard_bytes(entry) * self.shard_count(entry)

    def received_bytes(self, entry: PlanEntry, writer: int) -> int:
        """Bytes of ``entry`` that ``writer`` receives from the other holders (none when ``COWRITTEN``)."""
        if writer == COWRITTEN:
            return 0
        return _shard_bytes(entry) * sum(1 for rank in self.shard_holders(entry) if rank != writer)

    def assign_writers(self, spread: bool) -> dict[str, int]:
        """Which global rank writes each exported parameter: all rank 0, or, with ``spread``, its holders.

        Spread, a parameter whose shards each holder can write where they belong (``cowritable``) is
        written by all its holders (``COWRITTEN``), each its own bytes, and nothing is sent; any
        other goes to its least-loaded holder (in global order, so all ranks compute the same
        answer), so that every rank holding shards writes about the same number of bytes and a
        pipeline stage writes its own layers without sending them anywhere. A replicated parameter
        is written by its owner, the copy single-writer export takes too.
        """
        writers: dict[str, int] = {}
        written: dict[int, int] = {}
        for entry in self.exported_entries():
            holders = self.shard_holders(entry) if spread else (0,)
            if spread and self.cowritable(entry):
                writers[entry.name] = COWRITTEN
                for rank in holders:
                    written[rank] = written.get(rank, 0) + _shard_bytes(entry)
                continue
            writer = min(holders, key=lambda rank: (written.get(rank, 0), rank))
            written[writer] = written.get(writer, 0) + self.full_bytes(entry)
            writers[entry.name] = writer
        return writers


def _shard_bytes(entry: PlanEntry) -> int:
    return math.prod(entry.local_shape) * entry.dtype.itemsize


def validate_checkpoint(plan: TransferPlan, reader: SafetensorsReader, ignore: Sequence[str] = ()) -> None:
    """Every tensor the model needs is on disk with the right shape and a float dtype, and nothing else is.

    Raises before any weight moves.
    """
    expected = plan.expected_hf_shapes()
    on_disk = reader.shapes()
    ignored = [re.compile(pattern) for pattern in ignore]
    problems = []
    missing = [name for name in expected if name not in on_disk]
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    unexpected = [n for n in on_disk if n not in expected and not any(p.fullmatch(n) for p in ignored)]
    if unexpected:
        problems.append(f"unexpected tensors (no mapping uses them): {_listing(unexpected)}")
    wrong = [
        f"{name} in {reader.file_of(name).name} has shape {list(on_disk[name])}, the model needs {list(shape)}"
        for name, shape in expected.items()
        if name in on_disk and on_disk[name] != shape
    ]
    if wrong:
        problems.append("wrong shapes: " + _first(wrong))
    not_float = non_float_weights(reader, expected)
    if not_float:
        problems.append(f"{NOT_FLOAT}: " + _first(not_float))
    if problems:
        raise CheckpointError(f"checkpoint {reader.folder} does not match the model: " + " | ".join(problems))


def count_nonfinite_weights(plan: TransferPlan, reader: SafetensorsReader) -> dict[str, NonFinite]:
    """NaN/Inf counts of the HF tensors the model reads, those that hold any; all ranks call and get them all.

    Each rank counts the tensors of the parameters it speaks for (``PlanEntry.owner``), so the
    checkpoint is read once over the pipeline stages and expert ranks, one tensor at a time.
    """
    rank = dist.get_rank()
    mine = nonfinite_counts(reader, dict.fromkeys(name for entry in plan.entries if entry.owner == rank for name in plan.mapping(entry).hf_names))
    reader.release()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {name: count for found in gathered for name, count in found.items()}


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", and {len(names) - limit} more" if len(names) > limit else "")


def _first(lines: list[str], limit: int = 10) -> str:
    return "; ".join(lines[:limit]) + (f"; and {len(lines) - limit} more" if len(lines) > limit else "")


def _progress(items, desc: str):
    return tqdm(items, desc=desc, unit="tensor", delay=2.0, disable=dist.get_rank() != 0)


@frozen_heap()
def load_checkpoint(plan: TransferPlan, reader: SafetensorsReader, strategy: str = "slice", staged: bool | None = None) -> None:
    """Copy the HF checkpoint into this rank's parameters (all ranks call this together).

    Parameters on a CUDA device are filled through pinned host buffers with non-blocking copies
    (``PinnedUpload``); ``staged=True`` sends CPU parameters that way too (tests run that path on
    the CPU), ``False`` none. The reader's maps are closed at the end (it re-opens them on its next
    read), so that the checkpoint's pages do not stay in this rank's resident memory beside the model.
    """
    if strategy not in LOAD_STRATEGIES:
        raise ValueError(f"load strategy {strategy!r}; choose one of {LOAD_STRATEGIES}")
    gpu = next((local.param.device for local in plan.local.values() if local.param.device.type == "cuda"), None)
    if staged is None:
        staged = gpu is not None
    upload = PinnedUpload.for_device(gpu or torch.device("cpu")) if staged else None
    spare = _ShardBuffer()
    try:
        for entry in _progress(plan.local_entries(), "loading"):
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
    letting the reader's next re-open release the pages they span."""
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
    group = _tp_group(entry.expert)
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


@dataclass
class _Incoming:
    """An exported parameter this rank writes: its shards, some of them still arriving."""

    entry: PlanEntry
    shards: list[torch.Tensor]
    receives: list  # the irecv works of the shards still arriving
    buffers: list[torch.Tensor]  # the shards received into ``_ReceiveBuffers``

    @property
    def received_bytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.buffers)


class _ReceiveBuffers:
    """Memory for received shards, reused from one parameter to the next and zero-filled when new.

    Between two local gloo ranks, receiving into memory that no one had touched yet moved 0.22 GB/s
    (the kernel faults each fresh page in while it copies from the socket), into zero-filled memory
    0.97 GB/s, and into reused memory 2.4 GB/s. Buffers are reused only where the consumer is done
    with a parameter's tensors before it asks for the next one; all of them together stay under
    ``limit`` bytes (the free ones are dropped first).
    """

    def __init__(self, limit: int, device: torch.device, reuse: bool):
        self.limit = limit
        self.device = device
        self.reuse = reuse
        self.free: dict[int, list[torch.Tensor]] = {}
        self.allocated = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        stack = self.free.get(nbytes)
        if stack:
            raw = stack.pop()
            if not stack:
                del self.free[nbytes]
        else:
            while self.allocated + nbytes > self.limit and self.free:
                size = max(self.free)
                self.free[size].pop()
                if not self.free[size]:
                    del self.free[size]
                self.allocated -= size
            raw = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
            self.allocated += nbytes
        return raw.view(dtype).view(shape)

    def give(self, tensors: list[torch.Tensor]) -> None:
        if self.reuse:
            for tensor in tensors:
                self.free.setdefault(tensor.nbytes, []).append(tensor.reshape(-1).view(torch.uint8))


def export_tensors(
    plan: TransferPlan, writers: Mapping[str, int] | None = None, joined: bool = False
) -> Iterator[tuple[str, torch.Tensor | JoinedShards]]:
    """HF (name, tensor) pairs; every rank must drive it to the end, and each gets the pairs it writes.

    Pairs come in global order, except that a parameter whose shards are all at hand goes ahead of
    one whose shards are still arriving.

    ``writers`` names each parameter's writing rank (``TransferPlan.assign_writers``); by default rank
    0 writes everything. With ``joined``, a tensor made of several shards comes as ``JoinedShards``
    (for a writer that writes the parts one after another) instead of being joined into a copy, and
    a pair is valid only until the next one is asked for: its memory is reused. A ``COWRITTEN``
    parameter (``joined`` only) comes to each of its holders, with the other holders' parts as meta
    tensors: each writes its own.

    The holders of a parameter's shards send them straight to its writer, point-to-point (gloo's
    ``gather`` moved 1 GB/s where send/recv moved 5 GB/s between two local ranks). Every rank posts
    its sends and receives in the one global order, so that NCCL's in-order streams pair them up.
    Sends go out at once (they are the parameters themselves, no copies); receives run ahead of the
    writing within a window of the most bytes one parameter needs received (half the largest
    parameter at TP2), so that the next parameters arrive while this one is written, and parameters
    that wait for nothing (held here, or ``COWRITTEN``) are written while one arrives. Memory beyond
    the model: twice the window (the receive buffers, in flight or kept for reuse), plus one joined
    copy unless ``joined``.
    """
    rank = dist.get_rank()
    exported = plan.exported_entries()
    writers = writers or {entry.name: 0 for entry in exported}
    if not joined and COWRITTEN in writers.values():
        raise ValueError("co-written parameters come with meta parts, as JoinedShards: pass joined=True")
    on_gpu = torch.cuda.is_available() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    window = max((plan.received_bytes(entry, writers[entry.name]) for entry in exported), default=0)
    buffers = _ReceiveBuffers(2 * window, device, reuse=joined)
    queue: deque[_Incoming] = deque()
    sends: list = []
    failures: list[Exception] = []  # conversion errors, raised once every transfer is done
    queued_bytes = 0

    def post(tag: int, entry: PlanEntry) -> None:
        nonlocal queued_bytes
        writer, holders = writers[entry.name], plan.shard_holders(entry)
        if writer == COWRITTEN:  # each holder converts its own shard, the others' as meta stand-ins, and writes its parts
            own = [_local_tensor(plan, entry) if holder == rank else _meta_shard(entry) for holder in holders]
            queue.append(_Incoming(entry, own, [], []))
            return
        if rank in holders and rank != writer:
            sends.append(dist.isend(_local_tensor(plan, entry), dst=writer, tag=tag))
        if rank == writer:
            incoming = _Incoming(entry, [], [], [])
            for holder in holders:
                if holder == rank:
                    incoming.shards.append(_local_tensor(plan, entry))
                    continue
                shard = buffers.take(entry.local_shape, entry.dtype)
                incoming.receives.append(dist.irecv(shard, src=holder, tag=tag))
                incoming.buffers.append(shard)
                incoming.shards.append(shard)
            queue.append(incoming)
            queued_bytes += incoming.received_bytes

    def write(index: int) -> Iterator[tuple[str, torch.Tensor | JoinedShards]]:
        nonlocal queued_bytes
        incoming = queue[index]
        del queue[index]
        for work in incoming.receives:
            work.wait()
        try:
            converted = plan.mapping(incoming.entry).megatron_to_hf(incoming.shards, plan.context(incoming.entry, 0))
        except Exception as err:  # keep the transfers going, so that no other rank waits for this one
            failures.append(err)
            converted = {}
        incoming.shards = []
        for name, tensor in converted.items():
            yield name, tensor if joined else materialize(tensor)
        del converted
        buffers.give(incoming.buffers)
        queued_bytes -= incoming.received_bytes

    def ready() -> int | None:
        """The oldest queued parameter whose shards are all here, if any."""
        return next((i for i, incoming in enumerate(queue) if all(work.is_completed() for work in incoming.receives)), None)

    steps = [(tag, entry) for tag, entry in enumerate(exported) if rank == writers[entry.name] or rank in plan.shard_holders(entry)]
    for tag, entry in _progress(steps, "exporting"):
        need = plan.received_bytes(entry, rank) if rank == writers[entry.name] else 0
        while queue and queued_bytes + need > window:  # room for this parameter's receives
            yield from write(0)
        post(tag, entry)
        while (index := ready()) is not None:  # write what waits for nothing, even past a parameter still arriving
            yield from write(index)
    while queue:
        yield from write(0)
    for work in sends:
        work.wait()
    if failures:
        raise failures[0]


def _meta_shard(entry: PlanEntry) -> torch.Tensor:
    return torch.empty(entry.local_shape, dtype=entry.dtype, device="meta")


def _local_tensor(plan: TransferPlan, entry: PlanEntry) -> torch.Tensor:
    return plan.local[entry.name].param.detach().contiguous()
