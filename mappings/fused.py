"""One HF tensor holding several roles' tensors stacked along dim 0 (Phi-3's ``qkv_proj``, ``gate_up_proj``).

``FusedRowsMapping`` wraps a mapping whose HF side is several role tensors (``QKVMapping``'s q/k/v,
``GatedMLPMapping``'s gate/up) and reads them from one fused HF tensor instead: on load it presents
row blocks of the fused tensor as the inner mapping's roles (``RowBlock``: lazy, reading only what
the inner mapping narrows); on export it joins the inner mapping's per-role outputs back along dim 0
as one ``JoinedShards`` whose parts are the inner mapping's parts (views of the shards), so nothing
is copied and each TP rank can still write its own rows of the fused tensor. The row layout of each
role stays the inner mapping's: this adds only where each role's rows sit in the fused tensor.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from bridge.mappings.base import JoinedShards, MappingContext, MappingError, ParamMapping, TensorSource, WrappingMapping, join_shards
from bridge.mappings.gated_mlp import GatedMLPMapping
from bridge.mappings.qkv import QKVMapping


class RowBlock:
    """Rows ``[start, start + rows)`` of a ``TensorSource``, itself a ``TensorSource``: ``narrow`` reads only its slice."""

    def __init__(self, base: TensorSource, start: int, rows: int):
        self.base, self.start = base, start
        self.shape = torch.Size([rows, *base.shape[1:]])
        self.dtype = base.dtype

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim == 0:
            if start < 0 or start + length > self.shape[0]:
                raise MappingError(f"rows [{start}:{start + length}] are outside a block of {self.shape[0]} rows")
            return self.base.narrow(0, self.start + start, length)
        return self.base.narrow(0, self.start, self.shape[0]).narrow(dim, start, length)

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


class FusedRowsMapping(WrappingMapping):
    """``inner``'s role tensors read from, and written back to, the one HF tensor ``hf_param`` (roles in ``inner.hf_param`` order).

    ``inner`` says how many rows each role has (``role_rows``); its own HF names are placeholders
    naming the fused tensor and the role (``fused_role_names``), used only inside this mapping.
    """

    def __init__(self, hf_param: str, inner: ParamMapping):
        super().__init__(inner, hf_param)
        self.kind = f"{inner.kind} (fused on disk)"

    def role_blocks(self, fused: TensorSource, ctx: MappingContext) -> dict[str, RowBlock]:
        """Each role's rows of ``fused``, as the inner mapping's HF inputs."""
        rows = self.inner.role_rows(ctx, fused.shape[0])
        if sum(rows.values()) != fused.shape[0]:
            layout = " + ".join(f"{count} {role}" for role, count in rows.items())
            raise MappingError(f"{self.hf_names[0]}: has {fused.shape[0]} rows, expected {sum(rows.values())} ({layout} rows)")
        blocks, start = {}, 0
        for role, count in rows.items():
            blocks[role] = RowBlock(fused, start, count)
            start += count
        return blocks

    def shard_parts(self, hf: Mapping[str, TensorSource], ctx: MappingContext) -> list[torch.Tensor]:
        return self.inner.shard_parts(self.role_blocks(self.single(hf), ctx), ctx)

    def megatron_to_hf(self, shards: Sequence[torch.Tensor], ctx: MappingContext) -> dict[str, torch.Tensor | JoinedShards]:
        per_role = self.inner.megatron_to_hf(shards, ctx)
        parts: list[torch.Tensor] = []
        for role, name in self.inner.hf_param.items():
            tensor = per_role[name]
            if isinstance(tensor, JoinedShards) and tensor.dim != 0:
                raise MappingError(f"{self.hf_names[0]}: the {role} rows come joined along dim {tensor.dim}; only dim-0 joins fuse")
            parts += tensor.parts if isinstance(tensor, JoinedShards) else [tensor]
        return {self.hf_names[0]: join_shards(parts, 0)}


def fused_role_names(fused: str, roles: Sequence[str]) -> dict[str, str]:
    """Placeholder HF names of the roles inside ``fused`` (only ever seen in an inner mapping's messages)."""
    return {role: f"{fused}[{role} rows]" for role in roles}


def fused_qkv(megatron_param: str, hf_param: str) -> FusedRowsMapping:
    """Megatron's ``linear_qkv`` from one HF tensor holding q rows, then k rows, then v rows (Phi-3's ``qkv_proj``)."""
    return FusedRowsMapping(hf_param, QKVMapping(megatron_param, **fused_role_names(hf_param, ("q", "k", "v"))))


def fused_gate_up(megatron_param: str, hf_param: str) -> FusedRowsMapping:
    """A gated MLP's ``linear_fc1`` from one HF tensor holding gate rows, then up rows (Phi-3's ``gate_up_proj``)."""
    return FusedRowsMapping(hf_param, GatedMLPMapping(megatron_param, **fused_role_names(hf_param, ("gate", "up"))))
