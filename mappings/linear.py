"""Mappings of parameters that are one HF tensor each: column-, row-parallel, replicated, vocab."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from bridge.mappings.base import (
    JoinedShards,
    MappingContext,
    MappingError,
    ParamMapping,
    TensorSource,
    first_rows,
    join_shards,
    tp_slice,
    whole,
    zero_rows,
)


class ColumnParallelMapping(ParamMapping):
    """Output features split across TP ranks: weight and bias split along dim 0."""

    kind = "column"

    def shard_parts(self, hf: Mapping[str, TensorSource], ctx: MappingContext) -> list[torch.Tensor]:
        return [tp_slice(self.single(hf), 0, ctx.tp_rank, ctx.tp_size, self.hf_names[0])]

    def megatron_to_hf(self, shards: Sequence[torch.Tensor], ctx: MappingContext) -> dict[str, torch.Tensor | JoinedShards]:
        return {self.hf_names[0]: join_shards(shards, 0)}


class RowParallelMapping(ParamMapping):
    """Input features split across TP ranks: weight split along dim 1; a bias is whole on every rank."""

    kind = "row"

    @property
    def tp_sharded(self) -> bool:  # type: ignore[override]
        return not self.megatron_param.endswith(".bias")

    def shard_parts(self, hf: Mapping[str, TensorSource], ctx: MappingContext) -> list[torch.Tensor]:
        src = self.single(hf)
        if len(src.shape) == 1:
            return [whole(src)]
        return [tp_slice(src, 1, ctx.tp_rank, ctx.tp_size, self.hf_names[0])]

    def megatron_to_hf(self, shards: Sequence[torch.Tensor], ctx: MappingContext) -> dict[str, torch.Tensor | JoinedShards]:
        if shards[0].dim() == 1:
            return {self.hf_names[0]: shards[0]}
        return {self.hf_names[0]: join_shards(shards, 1)}


class ReplicatedMapping(ParamMapping):
    """The same tensor on every TP rank (norms, routers)."""

    kind = "replicated"
    tp_sharded = False

    def shard_parts(self, hf: Mapping[str, TensorSource], ctx: MappingContext) -> list[torch.Tensor]:
        return [whole(self.single(hf))]

    def megatron_to_hf(self, shards: Sequence[torch.Tensor], ctx: MappingContext) -> dict[str, torch.Tensor | JoinedShards]:
        return {self.hf_names[0]: shards[0]}


class VocabParallelMapping(ParamMapping):
    """Embedding / output layer: vocab rows split across TP ranks, zero rows past the HF vocab.

    Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by × TP``
    (``ctx.padded_vocab_size``); export drops the padding again.
    """

    kind = "vocab"

    def shard_parts(self, hf: Mapping[str, TensorSource], ctx: MappingContext) -> list[torch.Tensor]:
        src = self.single(hf)
        rows = src.shape[0]
        if rows != ctx.vocab_size:
            raise MappingError(f"{self.hf_names[0]}: has {rows} rows but the config's vocab_size is {ctx.vocab_size}")
        local_rows = ctx.padded_vocab_size // ctx.tp_size
        start = ctx.tp_rank * local_rows
        stop = min(start + local_rows, rows)
        real = src.narrow(0, min(start, rows), max(0, stop - start))
        return [real] if stop - start == local_rows else [real, zero_rows(local_rows - real.shape[0], real)]

    def megatron_to_hf(self, shards: Sequence[torch.Tensor], ctx: MappingContext) -> dict[str, torch.Tensor | JoinedShards]:
        return {self.hf_names[0]: first_rows(join_shards(shards, 0), ctx.vocab_size)}
