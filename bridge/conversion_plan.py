"""``plan_conversion``: how an HF checkpoint maps onto Megatron-Core at some parallel sizes, without moving weights.

``hfmb plan`` prints it; a Python user reads its rows and ``problems()``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bridge.auto_bridge import AutoBridge
from bridge.conversions import model_sizes
from bridge.engine.plan import CheckpointMatch, TransferPlan, count_nonfinite_weights, match_checkpoint
from bridge.hf.weight_values import NonFinite
from bridge.megatron.parallel import ParallelSizes, init_distributed


@dataclass
class PlanRow:
    """One HF tensor of the plan: the parameter it goes into, how, and where that parameter lives."""

    hf_name: str
    hf_shape: tuple[int, ...] | None  # None: not on disk
    megatron_name: str
    kind: str
    local_shape: tuple[int, ...]
    tp_split: bool | None  # None at TP=1
    stage: str  # "pp0" or "pp1.vp0"
    ranks: list[int]  # the global ranks holding a shard of the parameter
    needed_shape: tuple[int, ...] | None  # the shape the model needs, where the file's differs


@dataclass
class ConversionPlan:
    """How an HF checkpoint maps onto Megatron-Core at some parallel sizes, computed without moving weights."""

    bridge: AutoBridge
    sizes: ParallelSizes
    world_size: int
    model_config: Any  # the Megatron-Core TransformerConfig built
    padded_vocab_size: int
    rows: list[PlanRow]
    match: CheckpointMatch
    nonfinite: dict[str, NonFinite]
    parameters: int  # Megatron parameters of the whole model
    mapping_error: str | None = None  # a Megatron parameter with no mapping: nothing else could be planned

    def problems(self) -> list[str]:
        """Everything that makes the conversion fail, one line each (empty: it would succeed)."""
        return [self.mapping_error] if self.mapping_error else self.match.problems(limit=None)


def plan_conversion(hf: str | Path, *, sizes: ParallelSizes = ParallelSizes()) -> ConversionPlan | None:
    """Every HF tensor → Megatron parameter with its mapping, shapes and ranks, and the problems, without moving weights.

    Each tensor is read once (streaming) to count NaN/Inf values. All ranks call it; rank 0 gets the
    plan, the others None.
    """
    from bridge.mappings import MappingError
    from bridge.runtime import cpu_mode

    init_distributed()
    bridge = AutoBridge.from_hf_pretrained(hf)
    # Shapes only: on CPU the model is built on the meta device (nothing allocated or initialised).
    # On GPUs Megatron-Core allocates on the device itself, so the plan builds the real (empty) shards.
    with contextlib.nullcontext() if cpu_mode.cuda_available() else torch.device("meta"):
        model = bridge.to_megatron_model(**model_sizes(sizes), load_weights=False)
    world = dist.get_world_size()
    empty = CheckpointMatch(Path(bridge.hf_folder), [], [], [], [], [])
    plan_args = dict(bridge=bridge, sizes=sizes, world_size=world, model_config=model[0].config, padded_vocab_size=model[0].vocab_size)
    try:
        plan = bridge.plan(model)
    except MappingError as err:
        return ConversionPlan(**plan_args, rows=[], match=empty, nonfinite={}, parameters=0, mapping_error=str(err))
    held: list = [None] * world  # rank → the global names of the parameters it holds
    dist.all_gather_object(held, set(plan.local))
    nonfinite = count_nonfinite_weights(plan, bridge.reader)
    if dist.get_rank() != 0:
        return None
    match = match_checkpoint(plan, bridge.reader, bridge.model_bridge.hf_ignore)
    return ConversionPlan(
        **plan_args, rows=_plan_rows(plan, bridge, sizes, held), match=match, nonfinite=nonfinite, parameters=len(plan.entries)
    )


def _plan_rows(plan: TransferPlan, bridge: AutoBridge, sizes: ParallelSizes, held: list[set[str]]) -> list[PlanRow]:
    on_disk = bridge.reader.shapes()
    expected = plan.expected_hf_shapes()
    rows = []
    for entry in plan.entries:
        mapping = plan.mapping(entry)
        ranks = [rank for rank, names in enumerate(held) if entry.name in names]
        stage = f"pp{entry.pp_rank}" + (f".vp{entry.vp_stage}" if sizes.vpp else "")
        kind = entry.kind + (" (load only)" if mapping.load_only else "")
        for hf_name in mapping.hf_names:
            shape = on_disk.get(hf_name)
            needed = expected.get(hf_name)
            rows.append(
                PlanRow(
                    hf_name=hf_name,
                    hf_shape=None if shape is None else tuple(shape),
                    megatron_name=entry.name,
                    kind=kind,
                    local_shape=tuple(entry.local_shape),
                    tp_split=None if sizes.tp == 1 else mapping.tp_sharded,
                    stage=stage,
                    ranks=ranks,
                    needed_shape=tuple(needed) if shape is not None and needed is not None and shape != needed else None,
                )
            )
    return rows
