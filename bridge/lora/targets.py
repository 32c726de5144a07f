"""Which Megatron linear (and which role inside it) each LoRA target names, read off the model bridge's mapping registry.

A target is the last part of an HF module name (``q_proj``), as peft takes it. The registry already
says which HF tensors make up each Megatron weight: a fused ``linear_qkv`` has roles q/k/v, a gated
``linear_fc1`` gate/up, a plain linear one role. So the targets of a model are the HF weight names of
its linear mappings; no second table of names exists. Adapter parameters get names and mappings of
their own (``adapter_registry``): B of a column-parallel linear is split over TP like the rows of its
role, A whole on every rank; A of a row-parallel linear is split like its input columns, B whole.

Routed MoE experts are no modules in transformers 5 (each layer's experts are stacked parameters,
``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``down_proj``), so peft adapts them through
``target_parameters``: one A and B per stacked parameter, gate and up rows sharing A, each expert's
slice of A ``[r·E, in]`` and B ``[out, r·E]`` (``bridge.lora.expert_tensors``). The stacked
parameters and the per-expert tensors they hold come from the model bridge's ``FusedExperts`` views.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bridge.lora.config import LoraError
from bridge.mappings import (
    ColumnParallelMapping,
    GatedMLPMapping,
    MappingRegistry,
    ParamMapping,
    QKVMapping,
    ReplicatedMapping,
    RowParallelMapping,
    VocabParallelMapping,
)
from bridge.mappings.fused import FusedRowsMapping, fused_role_names
from bridge.mappings.hf_views import FusedExperts, stacked_slice_name

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
class ExpertParameterRole:
    """A routed expert's linear adapted as a slice of peft's adapter of the stacked parameter holding it (all its roles).

    ``wrapped``: how many of the module's other targeted parameters peft wraps around this one (its
    ``ParamWrapper``s nest, the module's first parameter innermost), each adding ``base_layer.`` to the names.
    """

    target: str  # "gate_up_proj": the stacked parameter's name in its module
    hf_parameter: str  # "model.layers.*.mlp.experts.gate_up_proj": its path in transformers' model (``hf_module_paths``)
    wrapped: int

    def peft_name(self, matrix: str) -> str:
        """The name of expert ``*``'s slice of peft's ``lora_A`` or ``lora_B`` weight of the stacked parameter."""
        module = self.hf_parameter.rpartition(".")[0]
        return stacked_slice_name(f"{PEFT_PREFIX}{module}.{'base_layer.' * self.wrapped}lora_{matrix}.weight", "*")


@dataclass(frozen=True)
class AdaptedLinear:
    """A Megatron linear (pattern, ``*`` for numbers) that some targets adapt: its weight's mapping and the adapted roles."""

    module: str  # "decoder.layers.*.self_attention.linear_qkv"
    mapping: ParamMapping  # of ``module + ".weight"``
    roles: tuple[TargetRole | ExpertParameterRole, ...]

    @property
    def row_parallel(self) -> bool:
        return isinstance(self.mapping, RowParallelMapping)

    @property
    def adapts_whole(self) -> bool:
        """Whether one adapter spans all the linear's roles, as peft adapts one HF tensor holding them (Phi-3's
        ``qkv_proj``, a stacked expert parameter): B's rows are then laid out like the weight's."""
        return isinstance(self.mapping, FusedRowsMapping) or isinstance(self.roles[0], ExpertParameterRole)

    @property
    def spans_gate_and_up(self) -> bool:
        """Whether the one adapter's B holds a gated ``linear_fc1``'s gate and up rows (this rank's gate rows, then its up rows)."""
        inner = getattr(self.mapping, "inner", self.mapping)
        return self.adapts_whole and isinstance(inner, GatedMLPMapping)

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


def is_routed_expert(mapping: ParamMapping) -> bool:
    """Whether ``mapping`` is a routed expert's (Megatron's ``local_experts``), which transformers 5 holds stacked."""
    return ".local_experts." in mapping.megatron_param


def _absent(mapping: ParamMapping, absent: tuple[str, ...]) -> bool:
    """Whether an HF tensor of ``mapping`` matches one of the ``absent`` regular expressions."""
    return any(re.fullmatch(pattern, name.replace("*", "0")) for pattern in absent for name in mapping.hf_names)


def _linear_mappings(registry: MappingRegistry, absent: tuple[str, ...]) -> list[ParamMapping]:
    """The registry's linear weights (not norms, routers, embeddings or the output layer, even when the checkpoint
    stores them twice), but those whose HF tensors match ``absent`` (regular expressions: the model bridge's
    ``hf_not_in_transformers``, modules transformers' model and so peft do not have)."""
    found = []
    for mapping in registry:
        kind = getattr(mapping, "inner", mapping)  # a mapping of copies (``CopiedMapping``) is its inner one's kind
        if isinstance(kind, (ReplicatedMapping, VocabParallelMapping)) or mapping.load_only:
            continue
        if _absent(mapping, absent):
            continue
        if not mapping.megatron_param.endswith(".weight") or not all(name.endswith(".weight") for name in mapping.hf_names):
            continue
        found.append(mapping)
    return found


def adaptable_linears(registry: MappingRegistry, module_paths: ModulePaths = (), absent: tuple[str, ...] = ()) -> list[AdaptedLinear]:
    """Every linear module of the registry (``target_modules``) with all its roles; routed experts are parameters instead."""
    return [
        AdaptedLinear(mapping.megatron_param.removesuffix(".weight"), mapping, tuple(_roles(mapping, module_paths)))
        for mapping in _linear_mappings(registry, absent)
        if not is_routed_expert(mapping)
    ]


def stacked_expert_parameters(registry: MappingRegistry, views: tuple = (), absent: tuple[str, ...] = ()) -> list[tuple[ParamMapping, str]]:
    """Each routed expert linear's mapping with the stacked transformers parameter holding it (``model.layers.*.mlp.experts.gate_up_proj``).

    Read off the model bridge's ``FusedExperts`` views: a view's per-expert parts are the mapping's HF tensors.
    """
    stacked = {tuple(part.replace("{e}", "*") for part in view.parts): view.fused for view in views if isinstance(view, FusedExperts)}
    found = []
    for mapping in registry:
        if not is_routed_expert(mapping) or not mapping.megatron_param.endswith(".weight") or _absent(mapping, absent):
            continue
        if tuple(mapping.hf_names) in stacked:
            found.append((mapping, stacked[tuple(mapping.hf_names)]))
    return found


def _short(parameter: str) -> str:
    """``experts.gate_up_proj``: how peft's examples name a stacked expert parameter in ``target_parameters``."""
    return ".".join(parameter.split(".")[-2:])


def _expert_targets(
    registry: MappingRegistry,
    target_parameters: tuple[str, ...],
    architecture: str,
    views: tuple,
    absent: tuple[str, ...],
    module_paths: ModulePaths,
) -> list[AdaptedLinear]:
    """The routed expert linears ``target_parameters`` adapt (a name matches a stacked parameter it ends with, at a dot)."""
    stacked = stacked_expert_parameters(registry, views, absent)
    found = {parameter for _, parameter in stacked}
    # in the order transformers registers them in their module (the views'), which is the order peft nests its wrappers in
    parameters = [view.fused for view in views if isinstance(view, FusedExperts) and view.fused in found]

    def named(parameter: str, name: str) -> bool:
        return parameter == name or parameter.endswith("." + name)

    def matches(parameter: str) -> bool:
        return any(named(parameter, name) for name in target_parameters)

    unknown = [name for name in target_parameters if not any(named(p, name) for p in parameters)]
    if unknown:
        have = ", ".join(_short(p) for p in parameters) if parameters else "none (no routed experts the bridge can adapt)"
        raise LoraError(
            f"LoRA target parameter(s) {', '.join(map(repr, unknown))} do not exist in {architecture}; "
            f"its stacked expert parameters are: {have}"
        )
    adapted = []
    for mapping, parameter in stacked:
        if not matches(parameter):
            continue
        if type(mapping) not in (GatedMLPMapping, ColumnParallelMapping, RowParallelMapping):
            raise LoraError(
                f"LoRA on {architecture}'s {_short(parameter)} ({mapping.kind} experts) is not supported; "
                "only experts stored as separate gate/up/down tensors"
            )
        module = parameter.rpartition(".")[0]
        targeted = [p for p in parameters if p.rpartition(".")[0] == module and matches(p)]
        wrapped = len(targeted) - 1 - targeted.index(parameter)
        role = ExpertParameterRole(parameter.rpartition(".")[2], module_path(parameter, module_paths), wrapped)
        adapted.append(AdaptedLinear(mapping.megatron_param.removesuffix(".weight"), mapping, (role,)))
    return adapted


def resolve_targets(
    registry: MappingRegistry,
    targets: tuple[str, ...],
    architecture: str,
    module_paths: ModulePaths = (),
    absent: tuple[str, ...] = (),
    target_parameters: tuple[str, ...] = (),
    views: tuple = (),
) -> list[AdaptedLinear]:
    """The linears ``targets`` (modules) and ``target_parameters`` (stacked expert parameters) adapt, each with only its
    targeted roles; raises ``LoraError`` naming a target the model lacks.

    ``module_paths``: the model bridge's ``hf_module_paths``, for peft's names; ``absent``: its
    ``hf_not_in_transformers`` (never adapted); ``views``: its ``hf_views`` (where transformers stacks the experts).
    """
    linears = adaptable_linears(registry, module_paths, absent)
    available = sorted({role.target for linear in linears for role in linear.roles})
    unknown = [target for target in targets if target not in available]
    if unknown:
        experts = stacked_expert_parameters(registry, views, absent)
        hint = f" (routed experts are stacked parameters: target_parameters {_short(experts[0][1])!r}, ...)" if experts else ""
        raise LoraError(
            f"LoRA target module(s) {', '.join(map(repr, unknown))} do not exist in {architecture}; "
            f"its linear modules are: {', '.join(available)}{hint}"
        )
    adapted = []
    for linear in linears:
        roles = tuple(role for role in linear.roles if role.target in targets)
        if roles:
            adapted.append(AdaptedLinear(linear.module, linear.mapping, roles))
    return adapted + _expert_targets(registry, target_parameters, architecture, views, absent, module_paths)


def adapter_registry(adapted: list[AdaptedLinear]) -> MappingRegistry:
    """The mappings of the adapter parameters to peft's tensors (their TP layout included)."""
    mappings: list[ParamMapping] = []
    for linear in adapted:
        for role in linear.roles:
            a, b = linear.adapter_param("A", role), linear.adapter_param("B", role)
            if linear.row_parallel:
                mappings += [RowParallelMapping(a, role.peft_name("A")), ReplicatedMapping(b, role.peft_name("B"))]
            else:
                mappings += [ReplicatedMapping(a, role.peft_name("A")), _whole_rows_mapping(linear, b, role.peft_name("B"))]
    return MappingRegistry(mappings)


def _whole_rows_mapping(linear: AdaptedLinear, b: str, hf_name: str) -> ParamMapping:
    """The mapping of a column-parallel linear's B: its role's TP slice, or, for one adapter over the whole linear,
    B's rows held as the weight's (the fused tensor's roles, or a stacked expert's gate and up rows)."""
    if not linear.adapts_whole:
        return ColumnParallelMapping(b, hf_name)
    inner = getattr(linear.mapping, "inner", linear.mapping)
    if isinstance(inner, (QKVMapping, GatedMLPMapping)):
        return FusedRowsMapping(hf_name, type(inner)(b, **fused_role_names(hf_name, tuple(inner.hf_param))))
    return ColumnParallelMapping(b, hf_name)
