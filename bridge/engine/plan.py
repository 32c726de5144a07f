"""The plan every transfer follows: every Megatron parameter of the whole model, in one global order all ranks agree on.

``TransferPlan`` lists every parameter of all PP stages and virtual stages with its owner, local
shape, dtype and mapping, and decides who writes each exported parameter (``assign_writers``): one
of the ranks holding its shards, or all of them (``COWRITTEN``) where its HF tensors are joins along
dim 0 of its shards, so that no shard moves. ``match_checkpoint`` compares the plan with the files.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from bridge.hf.folder import CheckpointError
from bridge.hf.reader import SafetensorsReader
from bridge.hf.weight_values import NonFinite, non_float_weights, nonfinite_counts
from bridge.mappings import JoinedShards, MappingContext, MappingError, MappingRegistry, ParamMapping
from bridge.megatron.chunks import global_names, is_adapter_param, is_expert_param, named_weights, unwrap_chunks

logger = logging.getLogger(__name__)

COWRITTEN = -1  # the writer of a parameter that each holder of its shards writes itself (``TransferPlan.assign_writers``)
# How validation and ``hfmb plan`` name tensors stored in a dtype that is not a float weight's (``non_float_weights``).
NOT_FLOAT = (
    "tensors not stored as float weights (float32, bfloat16, float16 or float64; the bridge does not cast them, "
    "and quantized checkpoints are not supported)"
)


@dataclass(frozen=True)
class PlanEntry:
    """One Megatron parameter of the whole model, as every rank sees it."""

    name: str  # global name: layer and expert numbers counted over the whole model
    kind: str  # the mapping kind (column, row, qkv, ...)
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
    param: torch.Tensor  # a parameter, or a persistent buffer a mapping names (the router's expert bias)


def tp_group(expert: bool):
    """This rank's TP group, or its expert-TP group for routed-expert weights."""
    return parallel_state.get_expert_tensor_parallel_group() if expert else parallel_state.get_tensor_model_parallel_group()


def _is_source(expert: bool) -> bool:
    """Whether this rank speaks for its parameters: TP (ETP) rank 0 of data-parallel (expert-DP) replica 0."""
    if expert:
        return parallel_state.get_expert_tensor_parallel_rank() == 0 and parallel_state.get_expert_data_parallel_rank() == 0
    return parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0


class TransferPlan:
    """Every parameter of the model in global order, with its mapping; built collectively by all ranks."""

    def __init__(
        self,
        entries: list[PlanEntry],
        registry: MappingRegistry,
        local: dict[str, LocalParam],
        ctx: MappingContext,
        expert_ctx: MappingContext,
    ):
        self.entries = entries
        self.registry = registry
        self.local = local
        self.ctx = ctx
        self.expert_ctx = expert_ctx
        self._mappings: dict[str, ParamMapping] = {}
        self._meta_exports: dict[str, tuple[list[torch.Tensor], dict[str, torch.Tensor | JoinedShards]]] = {}

    @classmethod
    def build(cls, model, registry: MappingRegistry, hf_vocab_size: int, adapters: bool = False) -> "TransferPlan":
        """The plan of the model's own parameters, or with ``adapters`` of its LoRA adapters alone (``bridge.lora``)."""
        chunks = unwrap_chunks(model)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        rank = dist.get_rank()
        local: dict[str, LocalParam] = {}
        mine: list[PlanEntry] = []
        unmapped: list[str] = []
        for index, chunk in enumerate(chunks):
            vp_stage = getattr(chunk, "vp_stage", None) or 0
            names = global_names(chunk)
            for local_name, param in named_weights(chunk):
                if is_adapter_param(param) != adapters:
                    continue
                name = names[local_name]
                mapping = registry.find(name)
                if mapping is None:
                    if isinstance(param, torch.nn.Parameter):  # a buffer no mapping names is not a weight
                        unmapped.append(name)
                    continue
                module = chunk.get_submodule(local_name.rpartition(".")[0])
                expert = is_expert_param(module, param)
                local[name] = LocalParam(index, local_name, param)
                if _is_source(expert):
                    group = tuple(dist.get_process_group_ranks(tp_group(expert)))
                    mine.append(PlanEntry(name, mapping.kind, tuple(param.shape), param.dtype, pp_rank, vp_stage, expert, rank, group))
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (mine, unmapped))
        all_unmapped = sorted({name for _, names in gathered for name in names})
        if all_unmapped:
            raise MappingError(f"Megatron parameters with no mapping: {', '.join(all_unmapped)}")
        entries = {entry.name: entry for found, _ in gathered for entry in found}
        order = {name: i for i, name in enumerate(entries)}
        ordered = sorted(entries.values(), key=lambda e: (e.vp_stage, e.pp_rank, order[e.name]))
        ctx = mapping_context(chunks, hf_vocab_size)
        expert_ctx = replace(
            ctx,
            tp_rank=parallel_state.get_expert_tensor_parallel_rank(),
            tp_size=parallel_state.get_expert_tensor_parallel_world_size(),
        )
        return cls(ordered, registry, local, ctx, expert_ctx)

    def mapping(self, entry: PlanEntry) -> ParamMapping:
        if entry.name not in self._mappings:
            self._mappings[entry.name] = self.registry.resolve(entry.name)
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
            shards = [meta_shard(entry) for _ in range(self.shard_count(entry))]
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


def mapping_context(chunks: Sequence[torch.nn.Module], hf_vocab_size: int) -> MappingContext:
    """This rank's (non-expert) mapping context for the model of ``chunks`` (unwrapped ``GPTModel`` chunks)."""
    config = chunks[0].config
    return MappingContext(
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        vocab_size=hf_vocab_size,
        padded_vocab_size=chunks[0].vocab_size,
    )


def meta_shard(entry: PlanEntry) -> torch.Tensor:
    """A stand-in of ``entry``'s local shard with its shape and dtype and no values."""
    return torch.empty(entry.local_shape, dtype=entry.dtype, device="meta")


def _shard_bytes(entry: PlanEntry) -> int:
    return math.prod(entry.local_shape) * entry.dtype.itemsize


@dataclass
class CheckpointMatch:
    """How an HF checkpoint's tensors meet the plan: one list per kind of problem, and what the bridge ignores."""

    folder: Path
    missing: list[str]  # tensors the model needs that are not on disk
    unused: list[str]  # tensors on disk no mapping reads (and no ignore pattern names)
    wrong_shapes: list[str]  # "NAME in FILE is [..], the model needs [..]"
    not_float: list[str]  # "NAME in FILE is int8" (``non_float_weights``)
    ignored: list[str]  # tensors on disk that are not weights (``ModelBridge.hf_ignore``)
    carried: list[str] = field(default_factory=list)  # tensors exports copy unchanged (``ModelBridge.hf_carried``)

    def problems(self, limit: int | None = 10) -> list[str]:
        """One line per kind of problem, each listing at most ``limit`` tensors (None: all)."""
        lines = []
        if self.missing:
            lines.append(f"missing tensors: {_listing(sorted(self.missing), ', ', limit)}")
        if self.unused:
            lines.append(f"unused tensors (no mapping reads them): {_listing(sorted(self.unused), ', ', limit)}")
        if self.wrong_shapes:
            lines.append(f"wrong shapes: {_listing(self.wrong_shapes, '; ', limit)}")
        if self.not_float:
            lines.append(f"{NOT_FLOAT}: {_listing(self.not_float, '; ', limit)}")
        return lines


def match_checkpoint(
    plan: TransferPlan, reader: SafetensorsReader, ignore: Sequence[str] = (), carried: Sequence[str] = ()
) -> CheckpointMatch:
    """Compare the tensors on disk (names, shapes, dtypes) with the ones the plan's mappings read. No weight is read.

    ``ignore``: patterns of tensors that are not weights; ``carried``: of tensors exports copy unchanged.
    """
    expected = plan.expected_hf_shapes()
    on_disk = reader.shapes()
    extra = [name for name in on_disk if name not in expected]
    ignored = matching(extra, ignore)
    kept = matching(extra, carried)
    return CheckpointMatch(
        folder=Path(reader.folder),
        missing=[name for name in expected if name not in on_disk],
        unused=[name for name in extra if name not in ignored and name not in kept],
        wrong_shapes=[
            f"{name} in {reader.file_of(name).name} is {list(on_disk[name])}, the model needs {list(shape)}"
            for name, shape in expected.items()
            if name in on_disk and on_disk[name] != shape
        ],
        not_float=non_float_weights(reader, expected),
        ignored=ignored,
        carried=[name for name in kept if name not in ignored],
    )


def matching(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The ``names`` one of the regular expressions ``patterns`` matches whole."""
    compiled = [re.compile(pattern) for pattern in patterns]
    return [name for name in names if any(p.fullmatch(name) for p in compiled)]


def validate_checkpoint(plan: TransferPlan, reader: SafetensorsReader, ignore: Sequence[str] = (), carried: Sequence[str] = ()) -> None:
    """Every tensor the model needs is on disk with the right shape and a float dtype, and nothing else is
    (but tensors ``ignore`` names, not weights, and those ``carried`` names, copied by exports).

    Raises before any weight moves.
    """
    problems = match_checkpoint(plan, reader, ignore, carried).problems()
    if problems:
        raise CheckpointError(f"checkpoint {reader.folder} does not match the model: " + " | ".join(problems))


def count_nonfinite_weights(plan: TransferPlan, reader: SafetensorsReader) -> dict[str, NonFinite]:
    """NaN/Inf counts of the HF tensors the model reads, those that hold any; all ranks call and get them all.

    Each rank counts the tensors of the parameters it speaks for (``PlanEntry.owner``), so the
    checkpoint is read once over the pipeline stages and expert ranks, one tensor at a time.
    """
    rank = dist.get_rank()
    mine = nonfinite_counts(
        reader, dict.fromkeys(name for entry in plan.entries if entry.owner == rank for name in plan.mapping(entry).hf_names)
    )
    reader.release()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {name: count for found in gathered for name, count in found.items()}


def _listing(items: list[str], separator: str, limit: int | None) -> str:
    shown = separator.join(items if limit is None else items[:limit])
    return shown + (f"{separator}and {len(items) - limit} more" if limit is not None and len(items) > limit else "")


def progress(items, desc: str):
    """A progress bar over ``items`` on rank 0 (shown after 2 s)."""
    return tqdm(items, desc=desc, unit="tensor", delay=2.0, disable=dist.get_rank() != 0)
