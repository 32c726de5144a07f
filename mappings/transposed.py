"""HF expert tensors stored input-major, ``[in, out]`` (gpt-oss's ``mlp.experts.gate_up_proj`` / ``down_proj``).

gpt-oss keeps its experts as matrices it right-multiplies (``x @ W``), the transpose of an
``nn.Linear`` weight, and stores the gated MLP's gate and up columns **interleaved** (gate = even
columns, up = odd columns; its biases likewise). Megatron-Core's expert ``linear_fc1`` is
``cat(gate, up)`` along its rows, per TP rank its own slice of each; ``linear_fc2`` is ``[out, in]``
split along its input columns. Orientation and interleave are decided here and nowhere else; the
tests prove them with the shard oracle and the logits, never by shape (several of these matrices
are square).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from bridge.mappings.base import JoinedShards, MappingContext, MappingError, ParamMapping, TensorSource, join_shards, tp_slice


class InterleavedGateUpMapping(ParamMapping):
    """Megatron's ``linear_fc1`` (weight ``[2I, H]`` or bias ``[2I]``) ⇄ an HF tensor ``[H, 2I]`` (or ``[2I]``)
    whose last dim interleaves gate and up: column ``2j`` is gate row ``j``, column ``2j + 1`` up row ``j``.

    TP rank ``r`` holds gate rows and up rows ``[r·I/tp, (r+1)·I/tp)``: HF columns ``[2r·I/tp, 2(r+1)·I/tp)``,
    one contiguous block, de-interleaved.
    """

    kind = "interleaved_gate_up"

    def shard_parts(self, hf: Mapping[str, TensorSource], ctx: MappingContext) -> list[torch.Tensor]:
        src = self.single(hf)
        last = len(src.shape) - 1
        if src.shape[last] % (2 * ctx.tp_size):
            raise MappingError(
                f"{self.hf_names[0]}: its {src.shape[last]} interleaved gate/up columns do not split "
                f"into gate and up halves over TP size {ctx.tp_size}"
            )
        block = tp_slice(src, last, ctx.tp_rank, ctx.tp_size, self.hf_names[0])
        gate, up = block[..., 0::2], block[..., 1::2]
        return [gate.T, up.T] if last == 1 else [gate, up]

    def megatron_to_hf(self, shards: Sequence[torch.Tensor], ctx: MappingContext) -> dict[str, torch.Tensor | JoinedShards]:
        blocks = []
        for shard in shards:
            gate, up = shard.chunk(2, dim=0)
            pair = (gate.T, up.T) if shard.dim() == 2 else (gate, up)
            blocks.append(torch.stack(pair, dim=-1).flatten(-2))  # [..., I/tp, 2] → gate/up alternating
        return {self.hf_names[0]: join_shards(blocks, -1)}


class TransposedRowParallelMapping(ParamMapping):
    """Megatron's row-parallel weight ``[out, in]`` (split along ``in``) ⇄ an HF tensor ``[in, out]``.

    TP rank ``r``'s shard is the transpose of HF rows ``[r·in/tp, (r+1)·in/tp)``; on export the shards'
    transposes are those rows, so each holder can write its own.
    """

    kind = "transposed_row"

    def shard_parts(self, hf: Mapping[str, TensorSource], ctx: MappingContext) -> list[torch.Tensor]:
        src = self.single(hf)
        if len(src.shape) != 2:
            raise MappingError(f"{self.hf_names[0]}: expected a matrix, got shape {list(src.shape)}")
        return [tp_slice(src, 0, ctx.tp_rank, ctx.tp_size, self.hf_names[0]).T]

    def megatron_to_hf(self, shards: Sequence[torch.Tensor], ctx: MappingContext) -> dict[str, torch.Tensor | JoinedShards]:
        return {self.hf_names[0]: join_shards([shard.T for shard in shards], 0)}
