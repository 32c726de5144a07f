"""The transfer plan of any parallel layout, derived in one process from the TP=PP=1 model on the meta device.

``TransferPlan.build`` needs every rank's model; ``derive_plan`` needs one model, the TP=PP=1 one
built on the meta device (names, shapes and dtypes, nothing allocated), and computes what each rank
of the target layout would hold:

- **local shapes** through the mappings, which are pure tensor logic: the parameter's HF tensors at
  TP=1 (``megatron_to_hf`` of the whole parameter, on meta tensors) are cut as a load at the target
  TP (expert-TP for routed experts) cuts them (``shard_parts``), so the shard shape is the one a
  load builds;
- **stages** from Megatron-Core's own layer split (``get_transformer_layer_offset`` /
  ``get_num_layers_to_build`` at each pipeline rank and virtual stage): the embedding is on the
  first stage, the final norm and the output layer on the last;
- **ranks** from Megatron-Core's rank numbering (``RankLayout``), routed experts placed by EP.

One parameter exists only at PP > 1: with tied embeddings the last stage holds its own copy of the
embedding as ``output_layer.weight`` (Megatron-Core keeps them equal by an all-reduce), which the
TP=PP=1 model does not have; it is added with the embedding's shape.
The result is the plan ``TransferPlan.build`` would gather on that world: the same entries, in the
same order (``tests/test_derived_plan.py`` compares them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from bridge.engine.plan import PlanEntry, TransferPlan, mapping_context
from bridge.mappings import MappingContext, MappingError, MappingRegistry, ParamMapping
from bridge.mappings.base import materialize
from bridge.megatron.chunks import global_names, is_adapter_param, is_expert_param, named_weights, unwrap_chunks
from bridge.megatron.rank_layout import RankLayout

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
TIED_OUTPUT = "output_layer.weight"


@dataclass
class DerivedPlan:
    """A ``TransferPlan`` of a layout no process holds (its ``local`` is empty), and who holds each parameter."""

    plan: TransferPlan
    layout: RankLayout
    holders: dict[str, tuple[int, ...]]  # Megatron name → every global rank holding a shard or copy of it


def derive_plan(model, registry: MappingRegistry, hf_vocab_size: int, config, layout: RankLayout) -> DerivedPlan:
    """The plan of ``layout`` from ``model``, the TP=PP=1 model (one chunk, on the meta device) built with the target's vocabulary padding.

    ``config`` is the ``TransformerConfig`` at the target sizes (it decides the pipeline split).
    Raises ``MappingError`` naming every parameter with no mapping, as ``TransferPlan.build`` does.
    """
    (chunk,) = unwrap_chunks(model)
    sizes = layout.sizes
    whole = mapping_context([chunk], hf_vocab_size)
    if whole.tp_size != 1:
        raise ValueError(f"derive_plan needs the TP=1 model; this one is built at TP={whole.tp_size}")
    ctx = replace(whole, tp_size=sizes.tp)
    expert_ctx = replace(whole, tp_size=sizes.expert_tp)
    stages = layer_stages(config)
    experts = chunk.config.num_moe_experts or 0
    names = global_names(chunk)
    params = [(names[local], local, param) for local, param in named_weights(chunk) if not is_adapter_param(param)]
    if TIED_OUTPUT not in names.values() and getattr(chunk, "share_embeddings_and_output_weights", False) and sizes.pp > 1:
        embedding = chunk.embedding.word_embeddings
        params.append((TIED_OUTPUT, "embedding.word_embeddings.weight", embedding.weight))
    keyed, holders, unmapped = [], {}, []
    for index, (name, local, param) in enumerate(params):
        mapping = registry.find(name)
        if mapping is None:
            if isinstance(param, torch.nn.Parameter):  # a buffer no mapping names is not a weight
                unmapped.append(name)
            continue
        expert = is_expert_param(chunk.get_submodule(local.rpartition(".")[0]), param)
        pp_rank, vp_stage = _stage(name, stages, sizes.pp, sizes.vpp)
        held = layout.expert(pp_rank, _ep_rank(name, experts, sizes.ep)) if expert else layout.dense(pp_rank)
        shape = local_shape(mapping, param, whole, expert_ctx if expert else ctx)
        entry = PlanEntry(name, mapping.kind, shape, param.dtype, pp_rank, vp_stage, expert, held.owner, held.group)
        keyed.append(((vp_stage, pp_rank, held.owner, index), entry))
        holders[name] = held.ranks
    if unmapped:
        raise MappingError(f"Megatron parameters with no mapping: {', '.join(sorted(set(unmapped)))}")
    entries = [entry for _, entry in sorted(keyed, key=lambda item: item[0])]
    return DerivedPlan(TransferPlan(entries, registry, {}, ctx, expert_ctx), layout, holders)


def local_shape(mapping: ParamMapping, param: torch.Tensor, whole: MappingContext, ctx: MappingContext) -> tuple[int, ...]:
    """The shape of TP rank 0's shard of ``param`` (the whole parameter, at TP=1) when a load cuts it at ``ctx``'s TP size.

    ``param`` may be (and for a model of any size should be) a meta tensor: nothing is allocated
    beyond a row of zeros where a vocabulary is padded.
    """
    hf = {name: materialize(tensor) for name, tensor in mapping.megatron_to_hf([param.detach()], whole).items()}
    parts = mapping.shard_parts({role: hf[name] for role, name in mapping.hf_param.items()}, replace(ctx, tp_rank=0))
    return (sum(part.shape[0] for part in parts), *parts[0].shape[1:])


def layer_stages(config) -> dict[int, tuple[int, int]]:
    """Global layer index (0-based) → (pipeline rank, virtual stage) under ``config``'s pipeline split (Megatron-Core's own)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    vpp = config.virtual_pipeline_model_parallel_size
    stages: dict[int, tuple[int, int]] = {}
    for pp_rank in range(config.pipeline_model_parallel_size):
        for vp_stage in range(vpp or 1):
            vp = vp_stage if vpp else None
            offset = get_transformer_layer_offset(config, vp_stage=vp, pp_rank=pp_rank)
            for layer in range(offset, offset + get_num_layers_to_build(config, vp_stage=vp, pp_rank=pp_rank)):
                stages[layer] = (pp_rank, vp_stage)
    return stages


def _stage(name: str, stages: dict[int, tuple[int, int]], pp: int, vpp: int | None) -> tuple[int, int]:
    """(pipeline rank, virtual stage) of a parameter: its layer's, the first stage for the embedding, else the last."""
    match = _LAYER.match(name)
    if match is not None:
        return stages[int(match.group(1))]
    if name.startswith("embedding."):
        return 0, 0
    return pp - 1, (vpp or 1) - 1


def _ep_rank(name: str, experts: int, ep: int) -> int:
    """The expert-parallel rank holding the routed expert ``name`` belongs to (global expert numbers)."""
    match = _EXPERT.search(name)
    if match is None or not experts:
        raise MappingError(f"{name}: an expert parameter without a global expert number")
    return int(match.group(1)) // (experts // ep)
