"""HF q/k/v projections ⇄ Megatron's fused ``linear_qkv``, interleaved per query group.

Megatron's layout (``attention.py``): for each query group g, the rows of its ``heads/groups`` query
heads, then k_g, then v_g. TP splits whole groups, so rank r holds groups
``[r·G/tp, (r+1)·G/tp)`` in the same interleaved order. Works for weights ([rows, hidden]) and biases.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from bridge.mappings.base import JoinedShards, MappingContext, MappingError, ParamMapping, TensorSource, join_shards


class QKVMapping(ParamMapping):
    kind = "qkv"

    def __init__(self, megatron_param: str, *, q: str, k: str, v: str):
        super().__init__(megatron_param, {"q": q, "k": k, "v": v})

    def role_rows(self, ctx: MappingContext, rows: int = 0) -> dict[str, int]:
        """q, k and v rows: all query heads, then one head per query group each (``rows`` is not needed)."""
        groups, d = ctx.num_query_groups, ctx.head_dim
        return {"q": ctx.num_attention_heads * d, "k": groups * d, "v": groups * d}

    def _check(self, hf: Mapping[str, TensorSource], ctx: MappingContext) -> None:
        groups, d = ctx.num_query_groups, ctx.head_dim
        for role, rows in self.role_rows(ctx).items():
            if hf[role].shape[0] != rows:
                raise MappingError(
                    f"{self.hf_param[role]}: has {hf[role].shape[0]} rows, expected {rows} "
                    f"(num_attention_heads={ctx.num_attention_heads}, num_key_value_heads={groups}, head_dim={d})"
                )
        if groups % ctx.tp_size:
            raise MappingError(
                f"{self.megatron_param}: num_query_groups ({groups}) is not divisible by TP size ({ctx.tp_size}); "
                "choose a TP size that divides the number of key/value heads"
            )

    def shard_parts(self, hf: Mapping[str, TensorSource], ctx: MappingContext) -> list[torch.Tensor]:
        self._check(hf, ctx)
        d = ctx.head_dim
        q_rows = ctx.num_attention_heads // ctx.num_query_groups * d
        local_groups = ctx.num_query_groups // ctx.tp_size
        first = ctx.tp_rank * local_groups
        q = hf["q"].narrow(0, first * q_rows, local_groups * q_rows)
        k = hf["k"].narrow(0, first * d, local_groups * d)
        v = hf["v"].narrow(0, first * d, local_groups * d)
        parts = []
        for group in range(local_groups):
            parts += [q.narrow(0, group * q_rows, q_rows), k.narrow(0, group * d, d), v.narrow(0, group * d, d)]
        return parts

    def megatron_to_hf(self, shards: Sequence[torch.Tensor], ctx: MappingContext) -> dict[str, torch.Tensor | JoinedShards]:
        d = ctx.head_dim
        groups = ctx.num_query_groups
        heads_per_group = ctx.num_attention_heads // groups
        group_rows = (heads_per_group + 2) * d
        rows = sum(shard.shape[0] for shard in shards)
        if rows != groups * group_rows:
            raise MappingError(
                f"{self.megatron_param}: has {rows} rows, expected "
                f"{groups * group_rows} for {ctx.num_attention_heads} heads in {groups} groups of dim {d}"
            )
        parts: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "v": []}
        for shard in shards:  # each group's q, k and v rows are contiguous blocks of its shard
            for group in shard.split(group_rows, dim=0):
                for role, block in zip(("q", "k", "v"), group.split([heads_per_group * d, d, d], dim=0)):
                    parts[role].append(block)
        return {self.hf_param[role]: join_shards(blocks, 0) for role, blocks in parts.items()}
