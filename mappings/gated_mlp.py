"""HF gate/up projections ⇄ Megatron's fused ``linear_fc1`` of a gated (SwiGLU) MLP.

At TP=1 ``linear_fc1`` is ``cat(gate, up)``. Under TP rank r holds ``cat(gate_r, up_r)``, its own
slice of each — not a slice of the TP=1 tensor — which is why this needs a mapping of its own.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from bridge.mappings.base import JoinedShards, MappingContext, MappingError, ParamMapping, TensorSource, join_shards, tp_slice


class GatedMLPMapping(ParamMapping):
    kind = "gated_mlp"

    def __init__(self, megatron_param: str, *, gate: str, up: str):
        super().__init__(megatron_param, {"gate": gate, "up": up})

    def role_rows(self, ctx: MappingContext, rows: int) -> dict[str, int]:
        """Gate and up: half of ``rows`` each (an odd count fits neither, and the caller's sum check says so)."""
        return {"gate": rows // 2, "up": rows // 2}

    def shard_parts(self, hf: Mapping[str, TensorSource], ctx: MappingContext) -> list[torch.Tensor]:
        gate, up = hf["gate"], hf["up"]
        if tuple(gate.shape) != tuple(up.shape):
            raise MappingError(f"{self.hf_param['gate']} has shape {list(gate.shape)} but {self.hf_param['up']} has {list(up.shape)}")
        if gate.shape[0] % ctx.tp_size:
            raise MappingError(f"{self.megatron_param}: the MLP size ({gate.shape[0]}) is not divisible by TP size ({ctx.tp_size})")
        return [
            tp_slice(gate, 0, ctx.tp_rank, ctx.tp_size, self.hf_param["gate"]),
            tp_slice(up, 0, ctx.tp_rank, ctx.tp_size, self.hf_param["up"]),
        ]

    def megatron_to_hf(self, shards: Sequence[torch.Tensor], ctx: MappingContext) -> dict[str, torch.Tensor | JoinedShards]:
        halves = [shard.chunk(2, dim=0) for shard in shards]  # row blocks of a contiguous shard: contiguous views
        return {
            self.hf_param["gate"]: join_shards([g for g, _ in halves], 0),
            self.hf_param["up"]: join_shards([u for _, u in halves], 0),
        }
