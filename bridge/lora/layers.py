"""``LoraAdapter``: the A and B matrices of the roles adapted in one Megatron linear, and the update they add to its output.

Column-parallel base (``linear_qkv``, ``linear_fc1``): the output rows are split over TP, so each
role's B holds this rank's rows of that role and A is whole on every rank. The update of role R is
``scale · B_R (A_R x)``, added at the output rows where this rank's shard holds R's rows (for
``linear_qkv`` the rows of R in every local query group of Megatron's interleaved layout); the rows
come from the weight's own mapping (``column_role_rows``). ``A x`` is the same on every TP rank; its
gradient is all-reduced over TP (``copy_to_tensor_model_parallel_region``) so that A's gradient is
the whole one on every rank.

Row-parallel base (``linear_proj``, ``linear_fc2``): the input columns are split over TP, so A holds
this rank's columns and B is whole. ``A x`` is a partial sum on each rank, all-reduced over TP
(``reduce_from_tensor_model_parallel_region``) before B, as the base's own output is.

With sequence parallelism the column-parallel base's input is this rank's part of the sequence: ``A x``
(``r`` wide, cheap to move) is gathered along the sequence before B, and its gradient reduce-scattered back
(``gather_from_sequence_parallel_region``). The row-parallel base's output is scattered along the sequence,
so the partial ``A x`` is reduce-scattered there (``reduce_scatter_to_sequence_parallel_region``) before B.
Each rank then computes the gradient of the replicated matrix (A of a column-parallel linear, B of a
row-parallel one) from its part of the sequence only; the matrix is marked ``sequence_parallel``, as
Megatron-Core marks its norms, so that ``finalize_model_grads`` sums it over TP.

A routed expert's linear communicates nothing itself (Megatron-Core's ``explicit_expert_comm``): the
token dispatcher hands every expert-TP rank the same tokens and sums the row-parallel outputs (and
the input gradients) over expert TP. The adapters follow: ``A x`` and ``B h`` are local, and only the
replicated matrix's gradient, partial on each rank, is summed over the expert-TP group in the
backward pass (``_ReplicatedWeightLinear``); ``finalize_model_grads`` knows no expert-TP group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from bridge.lora.config import LoraError
from bridge.mappings import MappingContext, ParamMapping


class _ReplicatedWeightLinear(torch.autograd.Function):
    """``F.linear(x, weight)`` whose weight gradient is summed over ``group`` (the input gradient stays this rank's)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, group) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.group = group
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight
        grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        if ctx.group is not None and torch.distributed.get_world_size(ctx.group) > 1:
            torch.distributed.all_reduce(grad_weight, group=ctx.group)
        return grad_x, grad_weight, None


@dataclass(frozen=True)
class RoleRows:
    """Where one role's rows sit in this rank's shard of a column-parallel weight."""

    target: str
    positions: torch.Tensor  # int64: output rows of the local shard, in the role's own (HF) row order
    covers_all: bool  # the role is the whole shard, in order (a plain column-parallel linear)


def column_role_rows(mapping: ParamMapping, ctx: MappingContext, local_rows: int, roles: dict[str, str]) -> list[RoleRows]:
    """The local output rows of each adapted role (``roles``: base-mapping role → target) of a column-parallel weight.

    Found by running the mapping's own load on row numbers: each role's HF rows are numbered, the
    mapping builds this rank's shard of the numbers, and each role's numbers show where its rows
    went. Raises ``LoraError`` unless this rank holds one contiguous TP slice of each role's rows
    (what B's ``ColumnParallelMapping`` loads and exports).
    """
    rows = _role_rows(mapping, ctx, local_rows)
    offsets, start = {}, 0
    for role, count in rows.items():
        offsets[role] = start
        start += count
    numbered = {role: torch.arange(offsets[role], offsets[role] + count, dtype=torch.int64).unsqueeze(1) for role, count in rows.items()}
    local = mapping.hf_to_megatron(numbered, ctx).reshape(-1)
    found = []
    for role, target in roles.items():
        first, count = offsets[role], rows[role]
        mask = (local >= first) & (local < first + count)
        positions = mask.nonzero().reshape(-1)
        hf_rows = local[positions] - first
        share = count // ctx.tp_size
        expected = torch.arange(ctx.tp_rank * share, (ctx.tp_rank + 1) * share)
        if count % ctx.tp_size or not torch.equal(hf_rows, expected):
            raise LoraError(f"{mapping.megatron_param}: the rows of {target} are not one TP slice per rank; LoRA on it is not supported")
        found.append(RoleRows(target, positions, torch.equal(positions, torch.arange(local_rows))))
    return found


def _role_rows(mapping: ParamMapping, ctx: MappingContext, local_rows: int) -> dict[str, int]:
    """Rows of each HF tensor of ``mapping``, from its export of meta shards of ``local_rows`` rows."""
    shards = [torch.empty(local_rows, 1, device="meta") for _ in range(ctx.tp_size)]
    shapes = {name: tensor.shape[0] for name, tensor in mapping.megatron_to_hf(shards, ctx).items()}
    by_name = {name: role for role, name in mapping.hf_param.items()}
    return {by_name[name]: count for name, count in shapes.items()}


class LoraAdapter(torch.nn.Module):
    """The adapters of one Megatron linear: ``lora_A[target]`` and ``lora_B[target]`` per adapted role.

    Column-parallel: A ``[r, in]``, B ``[local rows of the role, r]``; row-parallel: A ``[r, local in]``,
    B ``[out, r]``. ``delta(x)`` is the update to add to the base linear's output for its input ``x``;
    ``sequence_parallel`` as the base linear's. ``expert_group``: a routed expert's linear, its expert-TP group;
    ``allreduce``: the base weight's (Megatron-Core's DDP reduces ``False`` over expert DP); ``gated_targets``: roles
    whose B spans a gated ``linear_fc1``'s gate and up rows (a stacked expert parameter's).
    """

    def __init__(
        self,
        *,
        row_parallel: bool,
        sequence_parallel: bool,
        in_features: int,
        out_features: int,
        column_rows: list[RoleRows] | None,
        targets: list[str],
        r: int,
        scale: float,
        dropout: float,
        dtype: torch.dtype,
        device: torch.device,
        expert_group=None,
        allreduce: bool = True,
        gated_targets: tuple[str, ...] = (),
    ):
        super().__init__()
        self.row_parallel = row_parallel
        self.expert = expert_group is not None
        self.expert_group = expert_group
        self.sequence_parallel = sequence_parallel and not self.expert
        self.gated_targets = gated_targets  # B's local rows are this rank's gate rows, then its up rows
        self.out_features = out_features
        self.scale = scale
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.lora_A = torch.nn.ParameterDict()
        self.lora_B = torch.nn.ParameterDict()
        for matrices in (self.lora_A, self.lora_B):  # marked as Megatron-Core marks an expert's modules (the plans read it)
            matrices.is_expert = self.expert
        self.rows = {} if column_rows is None else {rows.target: rows for rows in column_rows}
        for target in targets:
            b_rows = out_features if row_parallel else self.rows[target].positions.numel()
            self.lora_A[target] = torch.nn.Parameter(torch.zeros(r, in_features, dtype=dtype, device=device))
            self.lora_B[target] = torch.nn.Parameter(torch.zeros(b_rows, r, dtype=dtype, device=device))
            if self.sequence_parallel:  # the replicated matrix's gradient comes from this rank's part of the sequence
                replicated = self.lora_B[target] if row_parallel else self.lora_A[target]
                replicated.sequence_parallel = True
            for matrix in (self.lora_A[target], self.lora_B[target]):  # DDP: an expert's gradients are reduced over expert DP
                matrix.allreduce = allreduce

    def bind(self, base: torch.nn.Module) -> None:
        """Remember the linear this adapts (not as a submodule: its weight stays out of this module's parameters)."""
        self._base = (base,)

    @property
    def base_weight(self) -> torch.nn.Parameter:
        return self._base[0].weight

    @property
    def targets(self) -> list[str]:
        return list(self.lora_A.keys())

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``scale · B A x`` for every adapted role, laid out like the base linear's (local) output."""
        x = self.dropout(x.to(next(iter(self.lora_A.values())).dtype))
        out = None
        for target in self.targets:
            y = self._role_update(x, self.lora_A[target], self.lora_B[target]) * self.scale
            rows = None if self.row_parallel else self.rows[target]
            if rows is None or rows.covers_all:
                out = y if out is None else out + y
                continue
            if out is None:
                out = y.new_zeros(*y.shape[:-1], self.out_features)
            out = out.index_add(-1, rows.positions.to(y.device), y)
        return out

    def _role_update(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``B (A x)`` of one role, with the communication of the base linear's kind (see the module docstring)."""
        if self.expert:
            if self.row_parallel:
                return _ReplicatedWeightLinear.apply(F.linear(x, a), b, self.expert_group)
            return F.linear(_ReplicatedWeightLinear.apply(x, a, self.expert_group), b)
        if self.row_parallel:
            reduce = reduce_scatter_to_sequence_parallel_region if self.sequence_parallel else reduce_from_tensor_model_parallel_region
            return F.linear(reduce(F.linear(x, a)), b)
        h = F.linear(x, a)
        h = gather_from_sequence_parallel_region(h) if self.sequence_parallel else copy_to_tensor_model_parallel_region(h)
        return F.linear(h, b)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (this rank's shard of the base weight) plus ``scale · B A`` of every role, computed in fp32."""
        merged = weight.detach().float().clone()
        for target in self.targets:
            delta = (self.lora_B[target].detach().float() @ self.lora_A[target].detach().float()) * self.scale
            if self.row_parallel:
                merged += delta
            else:
                merged.index_add_(0, self.rows[target].positions.to(merged.device), delta)
        return merged

    def forward_hook(self, module: torch.nn.Module, args: tuple, output: tuple) -> tuple:
        """The base linear's forward hook: its ``(output, bias)`` with the update added to the output."""
        out, bias = output
        return out + self.delta(args[0]).to(out.dtype), bias
