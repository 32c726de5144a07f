"""``plan_conversion``: how an HF checkpoint maps onto Megatron-Core at some parallel sizes, without moving weights.

``hfmb plan`` prints it; a Python user reads its rows and ``problems()``. It runs in one process
whatever the sizes: no rank is started and no weight is allocated. The model is built once, at
TP=PP=1 on the meta device, and every rank's parameters (local shapes, stage, owner, holders) are
derived from it through the mappings and Megatron-Core's own rank numbering
(``bridge.engine.derived_plan``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bridge.auto_bridge import AutoBridge
from bridge.engine.derived_plan import DerivedPlan, derive_plan
from bridge.engine.plan import CheckpointMatch, match_checkpoint
from bridge.hf.weight_values import NonFinite, nonfinite_counts
from bridge.megatron.builder import vocab_rows
from bridge.megatron.parallel import ParallelSizes
from bridge.megatron.rank_layout import RankLayout, smallest_world

logger = logging.getLogger(__name__)


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
    model_config: Any  # the Megatron-Core TransformerConfig at ``sizes``
    padded_vocab_size: int
    rows: list[PlanRow]
    match: CheckpointMatch
    nonfinite: dict[str, NonFinite]
    parameters: int  # Megatron parameters of the whole model
    mapping_error: str | None = None  # a Megatron parameter with no mapping: nothing else could be planned

    def problems(self) -> list[str]:
        """Everything that makes the conversion fail, one line each (empty: it would succeed)."""
        return [self.mapping_error] if self.mapping_error else self.match.problems(limit=None)


def plan_conversion(hf: str | Path, *, sizes: ParallelSizes = ParallelSizes(), world_size: int | None = None) -> ConversionPlan | None:
    """Every HF tensor → Megatron parameter with its mapping, shapes and ranks, and the problems, without moving weights.

    Computed in this process for a world of ``world_size`` ranks (default: the running torchrun
    world when it has several ranks, else the smallest world ``sizes`` need), so a plain process
    plans any layout. The sizes are checked against the config first. Each tensor is read once
    (streaming) to count NaN/Inf values. Under torchrun all ranks call it (they set up
    torch.distributed and a TP=PP=1 parallel state together, so a caller must not hold Megatron-Core's
    parallel state at other sizes); rank 0 gets the plan, the others None.
    """
    from bridge.mappings import MappingError

    bridge = AutoBridge.from_hf_pretrained(hf)
    config = bridge.transformer_config(sizes)  # checks the sizes against the config first, as every conversion does
    world = world_size or _running_world() or smallest_world(sizes)
    layout = RankLayout(sizes, world)
    padded = vocab_rows(bridge.model_bridge.vocab_size, sizes.tp)
    logger.info("building the model once, at TP=PP=1 on the meta device, to derive the parameters of %d rank(s)", world)
    with torch.device("meta"):
        model = bridge.to_megatron_model(load_weights=False, padded_vocab_size=padded)
    if dist.get_rank() != 0:
        return None
    plan_args = dict(bridge=bridge, sizes=sizes, world_size=world, model_config=config, padded_vocab_size=padded)
    try:
        derived = derive_plan(model, bridge.model_bridge.mapping_registry(), bridge.model_bridge.vocab_size, config, layout)
    except MappingError as err:
        empty = CheckpointMatch(Path(bridge.hf_folder), [], [], [], [], [])
        return ConversionPlan(**plan_args, rows=[], match=empty, nonfinite={}, parameters=0, mapping_error=str(err))
    plan = derived.plan
    logger.info("counting NaN/Inf values (each tensor read once)")
    nonfinite = nonfinite_counts(bridge.reader, dict.fromkeys(name for entry in plan.entries for name in plan.mapping(entry).hf_names))
    bridge.reader.release()
    match = match_checkpoint(plan, bridge.reader, bridge.model_bridge.hf_ignore, bridge.model_bridge.hf_carried)
    return ConversionPlan(
        **plan_args,
        rows=_plan_rows(derived, bridge, sizes),
        match=match,
        nonfinite=nonfinite,
        parameters=len(plan.entries),
    )


def _running_world() -> int | None:
    """The torchrun world this process is part of, when it has more than one rank."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    return world if world > 1 else None


def _plan_rows(derived: DerivedPlan, bridge: AutoBridge, sizes: ParallelSizes) -> list[PlanRow]:
    plan = derived.plan
    on_disk = bridge.reader.shapes()
    expected = plan.expected_hf_shapes()
    rows = []
    for entry in plan.entries:
        mapping = plan.mapping(entry)
        ranks = list(derived.holders[entry.name])
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
