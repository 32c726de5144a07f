"""``FusedRowsMapping`` on its own: q/k/v and gate/up read from one HF tensor (Phi-3's layout) and written back fused.

Each TP rank's shard is checked against an oracle built by plain slicing of the fused tensor; the
export against the fused tensor bit for bit, as a join of views of the shards (no copy); the load
against a source that records what it is asked to read (only the shard's rows).
"""

from __future__ import annotations

import pytest
import torch
from bridge.mappings import (
    FusedRowsMapping,
    JoinedShards,
    MappingContext,
    MappingError,
    MappingRegistry,
    fused_gate_up,
    fused_qkv,
    materialize,
)

from tests.checks import same_bits

HEADS, GROUPS, D, HIDDEN, FFN = 8, 4, 4, 12, 24
QKV_ROWS = (HEADS + 2 * GROUPS) * D


def _ctx(tp: int, rank: int = 0) -> MappingContext:
    return MappingContext(
        tp_rank=rank, tp_size=tp, num_attention_heads=HEADS, num_query_groups=GROUPS, head_dim=D, vocab_size=1, padded_vocab_size=1
    )


def _distinct(*shape: int) -> torch.Tensor:
    """Every element different, so that any misplaced row shows."""
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)


def _qkv_oracle(fused: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Megatron's rank-``rank`` linear_qkv: for each of its query groups, its query heads' rows, its k rows, its v rows."""
    q, k, v = fused[: HEADS * D], fused[HEADS * D : (HEADS + GROUPS) * D], fused[(HEADS + GROUPS) * D :]
    per_group = HEADS // GROUPS * D
    local = GROUPS // tp
    rows = []
    for g in range(rank * local, (rank + 1) * local):
        rows += [q[g * per_group : (g + 1) * per_group], k[g * D : (g + 1) * D], v[g * D : (g + 1) * D]]
    return torch.cat(rows)


def _gate_up_oracle(fused: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Megatron's rank-``rank`` linear_fc1: its slice of the gate rows, then its slice of the up rows."""
    part = FFN // tp
    return torch.cat([fused[rank * part : (rank + 1) * part], fused[FFN + rank * part : FFN + (rank + 1) * part]])


class RecordingSource:
    """A ``TensorSource`` over a tensor that records the rows each ``narrow`` reads."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.shape, self.dtype = tensor, tensor.shape, tensor.dtype
        self.reads: list[tuple[int, int, int]] = []

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        self.reads.append((dim, start, length))
        return self.tensor.narrow(dim, start, length)


CASES = [
    pytest.param(fused_qkv, "q.w", (QKV_ROWS, HIDDEN), _qkv_oracle, id="qkv-weight"),
    pytest.param(fused_qkv, "q.b", (QKV_ROWS,), _qkv_oracle, id="qkv-bias"),
    pytest.param(fused_gate_up, "gu.w", (2 * FFN, HIDDEN), _gate_up_oracle, id="gate_up"),
]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("make,name,shape,oracle", CASES)
def test_shards_equal_plain_slicing_and_export_gives_the_fused_tensor_back(make, name, shape, oracle, tp):
    fused = _distinct(*shape)
    mapping = make("param", name)
    shards = []
    for rank in range(tp):
        want = oracle(fused, tp, rank)
        assert same_bits(torch.cat(mapping.shard_parts({"": fused}, _ctx(tp, rank))), want), f"rank {rank}: shard_parts"
        loaded = mapping.hf_to_megatron({"": fused}, _ctx(tp, rank), out=torch.full_like(want, float("nan")))
        assert same_bits(loaded, want), f"rank {rank}: hf_to_megatron into a parameter"
        shards.append(loaded)
    (exported_name, exported), *more = mapping.megatron_to_hf(shards, _ctx(tp)).items()
    assert exported_name == name and not more
    assert same_bits(materialize(exported), fused)
    # one join of views of the shards, nested joins flattened: each TP rank can write its own rows in place
    assert isinstance(exported, JoinedShards) and exported.dim == 0
    assert all(isinstance(part, torch.Tensor) and any(part._base is shard for shard in shards) for part in exported.parts)


@pytest.mark.parametrize("make,name,shape,oracle", CASES)
def test_load_reads_only_the_shard_s_rows(make, name, shape, oracle):
    source = RecordingSource(_distinct(*shape))
    mapping = make("param", name)
    mapping.hf_to_megatron({"": source}, _ctx(2, 1))
    assert all(dim == 0 for dim, _, _ in source.reads)
    assert sum(length for _, _, length in source.reads) == shape[0] // 2  # half the rows at TP2, never the whole tensor


def test_a_fused_tensor_of_the_wrong_size_is_refused_by_name():
    with pytest.raises(MappingError, match=r"qkv_proj\.weight: has 60 rows, expected 64 \(32 q \+ 16 k \+ 16 v rows\)"):
        fused_qkv("param", "model.layers.0.self_attn.qkv_proj.weight").shard_parts({"": torch.zeros(60, HIDDEN)}, _ctx(1))
    with pytest.raises(MappingError, match=r"gate_up_proj\.weight: has 49 rows, expected 48 \(24 gate \+ 24 up rows\)"):
        fused_gate_up("param", "model.layers.0.mlp.gate_up_proj.weight").shard_parts({"": torch.zeros(49, HIDDEN)}, _ctx(1))


def test_resolving_binds_the_inner_mapping_to_the_layer():
    registry = MappingRegistry([fused_qkv("decoder.layers.*.self_attention.linear_qkv.weight", "model.layers.*.self_attn.qkv_proj.weight")])
    bound = registry.resolve("decoder.layers.3.self_attention.linear_qkv.weight")
    assert isinstance(bound, FusedRowsMapping) and bound.hf_names == ["model.layers.3.self_attn.qkv_proj.weight"]
    assert bound.inner.megatron_param == "decoder.layers.3.self_attention.linear_qkv.weight"
    assert bound.kind == "qkv (fused on disk)" and bound.tp_sharded
    with pytest.raises(MappingError, match=r"decoder\.layers\.3\.self_attention\.linear_qkv\.weight: num_query_groups \(4\)"):
        bound.shard_parts({"": torch.zeros(QKV_ROWS, HIDDEN)}, _ctx(8))
