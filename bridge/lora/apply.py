"""Applying LoRA to a bridged model: adapters on the targeted linears, base frozen, adapters initialised the same at every layout.

All ranks call these together (they run collectives). ``apply_lora`` checks everything (targets,
linear types) on every rank before it changes the model, and raises the same
error everywhere.
"""

from __future__ import annotations

import logging
import math
import zlib

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, set_tensor_model_parallel_attributes

from bridge.engine.plan import TransferPlan, mapping_context
from bridge.lora.config import LoraConfig, LoraError
from bridge.lora.layers import LoraAdapter, RoleRows, column_role_rows
from bridge.lora.sharding import install_adapter_sharding, remove_adapter_sharding
from bridge.lora.targets import ADAPTER_MODULE, AdaptedLinear, adapter_registry, resolve_targets
from bridge.mappings import MappingContext
from bridge.megatron.chunks import ADAPTER_ATTR, global_names, is_adapter_param, unwrap_chunks
from bridge.runtime.rank_errors import raise_first

logger = logging.getLogger(__name__)

_CONFIG_ATTR = "bridge_lora_config"  # on each GPTModel chunk: the LoraConfig its adapters were made with


def lora_config_of(model) -> LoraConfig | None:
    """The ``LoraConfig`` of the adapters applied to ``model``, or None."""
    return getattr(unwrap_chunks(model)[0], _CONFIG_ATTR, None)


def lora_adapters(model) -> list[LoraAdapter]:
    """This rank's adapters, in model order."""
    return [module for chunk in unwrap_chunks(model) for module in chunk.modules() if isinstance(module, LoraAdapter)]


def adapter_plan(model, bridge) -> TransferPlan:
    """The transfer plan of the adapter parameters (their global names ⇄ peft's tensors); all ranks call."""
    config = lora_config_of(model)
    if config is None:
        raise LoraError("the model has no LoRA adapters; call apply_lora (or load_peft_adapter) first")
    adapted = _resolve_targets(bridge, config)
    return TransferPlan.build(model, adapter_registry(adapted), bridge.model_bridge.vocab_size, adapters=True)


def _resolve_targets(bridge, config: LoraConfig) -> list[AdaptedLinear]:
    """``resolve_targets`` of ``config`` on the bridge's model: its mappings, architecture, module paths, the modules
    transformers lacks, and its views (where transformers stacks the experts)."""
    model_bridge = bridge.model_bridge
    return resolve_targets(
        model_bridge.mapping_registry(),
        config.targets,
        model_bridge.architecture,
        model_bridge.hf_module_paths,
        model_bridge.hf_not_in_transformers,
        config.target_parameters,
        model_bridge.hf_views,
    )


def apply_lora(model, bridge, config: LoraConfig, *, seed: int = 0, b_std: float = 0.0) -> list[LoraAdapter]:
    """Add adapters to the linears ``config.targets`` and ``config.target_parameters`` name, freeze every other
    parameter, and initialise the adapters.

    A is Kaiming-uniform as peft makes it, B zero (or normal with std ``b_std``, for tests), drawn
    per tensor from ``seed`` as whole HF-shaped tensors and sliced like the weights, so the same
    seed gives the same adapters at every TP/PP layout. Returns this rank's adapters. Raises
    ``LoraError`` (the model unchanged) on a target the architecture lacks, linears that are not
    Megatron-Core's local ``ColumnParallelLinear``/``RowParallelLinear`` (the Transformer Engine spec, grouped
    experts), or a model that already has adapters.
    """
    chunks = unwrap_chunks(model)
    ctx = mapping_context(chunks, bridge.model_bridge.vocab_size)
    found: list[tuple[torch.nn.Module, AdaptedLinear, list[RoleRows] | None]] = []
    error: Exception | None = None
    try:
        if lora_config_of(chunks) is not None:
            raise LoraError("the model already has LoRA adapters")
        adapted = _resolve_targets(bridge, config)
        found = _targeted_modules(chunks, adapted, ctx, config.dropout)
    except Exception as err:
        error = err
    raise_first(error)
    adapters = [_attach(module, linear, rows, config) for module, linear, rows in found]
    for chunk in chunks:
        for param in chunk.parameters():
            if not is_adapter_param(param):
                param.requires_grad_(False)
        setattr(chunk, _CONFIG_ATTR, config)
    init_adapter_weights(model, bridge, seed=seed, b_std=b_std)
    targets = ", ".join((*config.targets, *config.target_parameters))
    logger.info("LoRA r=%d alpha=%s on %s: %d adapted linears on this rank", config.r, config.alpha, targets, len(adapters))
    return adapters


def _targeted_modules(
    chunks: list[torch.nn.Module], adapted: list[AdaptedLinear], ctx: MappingContext, dropout: float
) -> list[tuple[torch.nn.Module, AdaptedLinear, list[RoleRows] | None]]:
    """This rank's linears that ``adapted`` names, each with its (bound) entry and, column-parallel, its roles' output rows.

    Raises ``LoraError`` on a linear that cannot be adapted (with ``dropout``, one with sequence parallelism).
    """
    found = []
    for chunk in chunks:
        names = global_names(chunk)
        for local_name, _ in chunk.named_parameters():
            if not local_name.endswith(".weight"):
                continue
            name = names[local_name]
            for linear in adapted:
                bound = linear.mapping.resolve(name)
                if bound is None:
                    continue
                module = chunk.get_submodule(local_name.removesuffix(".weight"))
                expected = RowParallelLinear if linear.row_parallel else ColumnParallelLinear
                if not isinstance(module, expected):
                    raise LoraError(
                        f"{name.removesuffix('.weight')} is a {type(module).__name__}; LoRA supports Megatron-Core's local "
                        f"{expected.__name__} only (not the Transformer Engine spec)"
                    )
                if dropout and getattr(module, "sequence_parallel", False):
                    raise LoraError(
                        f"{name.removesuffix('.weight')}: LoRA dropout={dropout} with sequence parallelism is not supported "
                        "(the TP ranks would draw one mask for different parts of the sequence); use dropout 0"
                    )
                rows = None if linear.row_parallel else _column_rows(linear, bound, ctx, module.weight.shape[0])
                found.append((module, AdaptedLinear(linear.module, bound, linear.roles), rows))
    return found


def _column_rows(linear: AdaptedLinear, bound, ctx: MappingContext, local_rows: int) -> list[RoleRows]:
    """Where each adapted role's rows sit in this rank's shard of a column-parallel linear (an adapter over the whole
    linear covers all the rows)."""
    if linear.adapts_whole:
        return [RoleRows(linear.roles[0].target, torch.arange(local_rows), True)]
    return column_role_rows(bound, ctx, local_rows, {role.role: role.target for role in linear.roles})


def _attach(module: torch.nn.Module, linear: AdaptedLinear, rows: list[RoleRows] | None, config: LoraConfig) -> LoraAdapter:
    weight = module.weight
    targets = [role.target for role in linear.roles]
    expert = bool(getattr(module, "is_expert", False))
    adapter = LoraAdapter(
        row_parallel=linear.row_parallel,
        sequence_parallel=bool(getattr(module, "sequence_parallel", False)),
        expert_group=module.tp_group if expert else None,
        allreduce=getattr(weight, "allreduce", True),
        gated_targets=tuple(role.target for role in linear.roles) if linear.spans_gate_and_up else (),
        in_features=weight.shape[1],
        out_features=weight.shape[0],
        column_rows=rows,
        targets=targets,
        r=config.r,
        scale=config.scale,
        dropout=config.dropout,
        dtype=config.dtype or weight.dtype,
        device=weight.device,
    )
    for target in targets:
        a, b = adapter.lora_A[target], adapter.lora_B[target]
        setattr(a, ADAPTER_ATTR, True)
        setattr(b, ADAPTER_ATTR, True)
        if linear.row_parallel:
            set_tensor_model_parallel_attributes(a, True, 1, 1)
        else:
            set_tensor_model_parallel_attributes(b, True, 0, 1)
    module.add_module(ADAPTER_MODULE, adapter)
    adapter.bind(module)
    adapter.hook_handle = module.register_forward_hook(adapter.forward_hook)
    install_adapter_sharding(module)  # split adapters TP-sharded in dist checkpoints, not replicated
    return adapter


@torch.no_grad()
def init_adapter_weights(model, bridge, *, seed: int = 0, b_std: float = 0.0) -> None:
    """Fill the adapters from ``seed``: A Kaiming-uniform (peft's default), B zero or normal(0, ``b_std``); all ranks call."""
    plan = adapter_plan(model, bridge)
    for entry in plan.local_entries():
        mapping = plan.mapping(entry)
        (hf_name, meta) = next(iter(plan.meta_export(entry).items()))
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(hf_name.encode()))
        full = torch.empty(meta.shape, dtype=torch.float32)
        if ".lora_A." in hf_name:
            bound = 1.0 / math.sqrt(meta.shape[1])  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft
            full.uniform_(-bound, bound, generator=generator)
        elif b_std:
            full.normal_(0.0, b_std, generator=generator)
        else:
            full.zero_()
        mapping.hf_to_megatron({"": full}, plan.context(entry), out=plan.local[entry.name].param)


def remove_lora(model) -> None:
    """Take the adapters off ``model`` (hooks and parameters) and make its own parameters trainable again."""
    for chunk in unwrap_chunks(model):
        for module in list(chunk.modules()):
            adapter = getattr(module, ADAPTER_MODULE, None)
            if isinstance(adapter, LoraAdapter):
                adapter.hook_handle.remove()
                delattr(module, ADAPTER_MODULE)
                remove_adapter_sharding(module)
        for param in chunk.parameters():
            param.requires_grad_(True)
        if hasattr(chunk, _CONFIG_ATTR):
            delattr(chunk, _CONFIG_ATTR)


def adapter_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters an optimizer should get: this rank's adapters."""
    return [param for chunk in unwrap_chunks(model) for param in chunk.parameters() if is_adapter_param(param)]
