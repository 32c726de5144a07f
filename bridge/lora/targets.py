"""Which Megatron linear (and which role inside it) each LoRA target names, read off the model bridge's mapping registry.

A target is the last part of an HF module name (``q_proj``), as peft takes it. The registry already
says which HF tensors make up each Megatron weight: a fused ``linear_qkv`` has roles q/k/v, a gated
``linear_fc1`` gate/up, a plain linear one role. So the targets of a model are the HF weight names of
its linear mappings; no second table of names exists. Adapter parameters get names and mappings of
their own (``adapter_registry``): B of a column-parallel linear is split over TP like the rows of its
role, A whole on every rank; A of a row-parallel linear is split like its input columns, B whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bridge.lora.config import LoraError
from bridge.mappings import (
    ColumnParallelMapping,
    MappingRegistry,
    ParamMapping,
    ReplicatedMapping,
    RowParallelMapping,
    VocabParallelMapping,
)

PEFT_PREFIX = "base_model.model."
ModulePaths = tuple[tuple[str, str], ...]  # (stored-name prefix, transformers module-path prefix)
ADAPTER_MODULE = "lora"  # the child module of an adapted linear that holds its adapters


@dataclass(frozen=True)
class TargetRole:
    """One adapted HF module inside a Megatron linear: its role in the base mapping, its name as a target, its module path."""

    role: str  # key of the base mapping's ``hf_param`` ("q", "gate", "" for a single tensor)
    target: str  # "q_proj"
    hf_module: str  # "model.layers.*.self_attn.q_proj" (``*`` as in the mapping), as transformers names the module

    def peft_name(self, matrix: str) -> str:
        """peft's tensor name of this module's ``lora_A`` or ``lora_B`` weight (``matrix`` "A" or "B")."""
        return f"{PEFT_PREFIX}{self.hf_module}.lora_{matrix}.weight"


@dataclass(frozen=True)
class AdaptedLinear:
    """A Megatron linear (pattern, ``*`` for numbers) that some targets adapt: its weight's mapping and the adapted roles."""

    module: str  # "decoder.layers.*.self_attention.linear_qkv"
    mapping: ParamMapping  # of ``module + ".weight"``
    roles: tuple[TargetRole, ...]

    @property
    def row_parallel(self) -> bool:
        return isinstance(self.mapping, RowParallelMapping)

    def adapter_param(self, matrix: str, role: TargetRole) -> str:
        """The adapter parameter's name (pattern) in the model: ``<module>.lora.lora_A.q_proj``."""
        return f"{self.module}.{ADAPTER_MODULE}.lora_{matrix}.{role.target}"


def module_path(hf_name: str, module_paths: ModulePaths = ()) -> str:
    """The path of the module holding the stored tensor ``hf_name`` in transformers' model (``ModelBridge.hf_module_paths``)."""
    module = hf_name.removesuffix(".weight")
    for stored, path in module_paths:
        if module.startswith(stored):
            return path + module[len(stored) :]
    return module


def _roles(mapping: ParamMapping, module_paths: ModulePaths) -> list[TargetRole]:
    roles = []
    for role, hf_name in mapping.hf_param.items():
        module = module_path(hf_name, module_paths)
        roles.append(TargetRole(role, module.rpartition(".")[2], module))
    return roles


def adaptable_linears(registry: MappingRegistry, module_paths: ModulePaths = (), absent: tuple[str, ...] = ()) -> list[AdaptedLinear]:
    """Every linear weight of the registry with all its roles (not norms, routers, embeddings or the output layer, even
    when the checkpoint stores them twice), but those whose HF tensors match ``absent`` (regular expressions: the
    model bridge's ``hf_not_in_transformers``, modules transformers' model and so peft do not have)."""
    found = []
    for mapping in registry:
        kind = getattr(mapping, "inner", mapping)  # a mapping of copies (``CopiedMapping``) is its inner one's kind
        if isinstance(kind, (ReplicatedMapping, VocabParallelMapping)) or mapping.load_only:
            continue
        if any(re.fullmatch(pattern, name.replace("*", "0")) for pattern in absent for name in mapping.hf_names):
            continue
        if not mapping.megatron_param.endswith(".weight") or not all(name.endswith(".weight") for name in mapping.hf_names):
            continue
        found.append(AdaptedLinear(mapping.megatron_param.removesuffix(".weight"), mapping, tuple(_roles(mapping, module_paths))))
    return found


def resolve_targets(
    registry: MappingRegistry, targets: tuple[str, ...], architecture: str, module_paths: ModulePaths = (), absent: tuple[str, ...] = ()
) -> list[AdaptedLinear]:
    """The linears ``targets`` adapt, each with only its targeted roles; raises ``LoraError`` on a target the model lacks.

    Routed MoE expert linears are refused (not supported yet), naming the target. ``module_paths``: the
    model bridge's ``hf_module_paths``, for peft's names; ``absent``: its ``hf_not_in_transformers`` (never adapted).
    """
    linears = adaptable_linears(registry, module_paths, absent)
    available = sorted({role.target for linear in linears for role in linear.roles})
    unknown = [target for target in targets if target not in available]
    if unknown:
        raise LoraError(
            f"LoRA target module(s) {', '.join(map(repr, unknown))} do not exist in {architecture}; "
            f"its linear modules are: {', '.join(available)}"
        )
    adapted = []
    for linear in linears:
        roles = tuple(role for role in linear.roles if role.target in targets)
        if not roles:
            continue
        if ".local_experts." in linear.module:
            raise LoraError(
                f"LoRA target {roles[0].target!r} adapts the routed MoE experts of {architecture} ({linear.module}): "
                "LoRA on expert linears is not supported yet; target the attention modules"
            )
        adapted.append(AdaptedLinear(linear.module, linear.mapping, roles))
    return adapted


def adapter_registry(adapted: list[AdaptedLinear]) -> MappingRegistry:
    """The mappings of the adapter parameters to peft's tensors (their TP layout included)."""
    mappings: list[ParamMapping] = []
    for linear in adapted:
        for role in linear.roles:
            a, b = linear.adapter_param("A", role), linear.adapter_param("B", role)
            if linear.row_parallel:
                mappings += [RowParallelMapping(a, role.peft_name("A")), ReplicatedMapping(b, role.peft_name("B"))]
            else:
                mappings += [ReplicatedMapping(a, role.peft_name("A")), ColumnParallelMapping(b, role.peft_name("B"))]
    return MappingRegistry(mappings)
