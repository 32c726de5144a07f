"""``JoinedShards``: export's unjoined tensors give exactly the bytes of the joined tensor, and the writer writes them so."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from bridge.mappings import (
    ColumnParallelMapping,
    GatedMLPMapping,
    JoinedShards,
    MappingContext,
    QKVMapping,
    RowParallelMapping,
    VocabParallelMapping,
    copy_bytes,
    materialize,
)


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _shards(shape: tuple[int, ...], count: int, dim: int, dtype=torch.bfloat16) -> tuple[torch.Tensor, list[torch.Tensor]]:
    full = torch.randn(shape).to(dtype)
    return full, [part.contiguous() for part in full.chunk(count, dim=dim)]


def _copied(tensor, piece: int, skew: int = 0) -> bytes:
    """The tensor's bytes as a writer copies them: ranges of ``piece`` bytes into a buffer starting ``skew`` bytes in."""
    buffer = torch.full((tensor.nbytes + skew,), 0xAB, dtype=torch.uint8)
    for start in range(0, tensor.nbytes, piece):
        copy_bytes(tensor, buffer[skew + start : skew + min(start + piece, tensor.nbytes)], start)
    return buffer[skew:].numpy().tobytes()


@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("piece", [1, 3, 100, 10**9])
@pytest.mark.parametrize("skew", [0, 1])
def test_copy_bytes_gives_the_joined_bytes_in_order(dim, piece, skew):
    """Ranges cut rows anywhere, and a buffer offset by one byte cannot be viewed as bf16 rows: every path must give the same bytes."""
    full, shards = _shards((37, 12, 2), 3 if dim == 0 else 4 if dim == 1 else 2, dim)
    joined = JoinedShards(shards, dim)
    assert joined.shape == full.shape and joined.nbytes == full.nbytes and joined.numel() == full.numel()
    assert torch.equal(joined.materialize(), full)
    assert _copied(joined, piece, skew) == _bytes(full)
    strided = full.transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous view of the same values
    assert _copied(strided, piece, skew) == _bytes(full)
    assert _copied(full, piece, skew) == _bytes(full)


def test_rows_of_a_join_are_views_of_its_parts():
    full, shards = _shards((40, 6), 4, 0)
    joined = JoinedShards(shards, 0)
    middle = joined.rows(7, 20)  # across three parts
    assert isinstance(middle, JoinedShards) and torch.equal(middle.materialize(), full[7:27])
    assert [part.data_ptr() for part in middle.parts] == [shards[0][7:].data_ptr(), shards[1].data_ptr(), shards[2][:7].data_ptr()]
    assert joined.rows(12, 5).data_ptr() == shards[1][2:].data_ptr()  # within one part: the part's own view
    columns = JoinedShards([shard.T.contiguous() for shard in shards], 1)
    assert torch.equal(columns.rows(2, 3).materialize(), full.T[2:5])


def test_first_rows_and_dtype_conversion_stay_unjoined():
    full, shards = _shards((40, 6), 4, 0)
    assert torch.equal(materialize(JoinedShards(shards, 0).first_rows(25)), full[:25])
    assert torch.equal(materialize(JoinedShards(shards, 0).first_rows(10)), full[:10])  # exactly one part
    converted = JoinedShards(shards, 0).to(torch.float32)
    assert isinstance(converted, JoinedShards) and torch.equal(converted.materialize(), full.float())
    with pytest.raises(ValueError):
        JoinedShards(shards, 1).first_rows(3)


def _ctx(tp: int) -> MappingContext:
    return MappingContext(tp_rank=0, tp_size=tp, num_attention_heads=8, num_query_groups=4, head_dim=4, vocab_size=50, padded_vocab_size=64)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_mapping_exports_the_tensors_it_imported(tp):
    """hf → shards (per TP rank) → megatron_to_hf → the same HF tensors, bit for bit, joined or written part by part."""
    torch.manual_seed(0)
    hidden = 16
    cases = [
        (
            QKVMapping("qkv", q="q", k="k", v="v"),
            {"q": torch.randn(32, hidden), "k": torch.randn(16, hidden), "v": torch.randn(16, hidden)},
        ),
        (GatedMLPMapping("fc1", gate="gate", up="up"), {"gate": torch.randn(24, hidden), "up": torch.randn(24, hidden)}),
        (ColumnParallelMapping("col", "col"), {"": torch.randn(24, hidden)}),
        (RowParallelMapping("row", "row"), {"": torch.randn(hidden, 24)}),
        (VocabParallelMapping("emb", "emb"), {"": torch.randn(50, hidden)}),
    ]
    for mapping, hf in cases:
        hf = {role: tensor.to(torch.bfloat16) for role, tensor in hf.items()}
        sources = {mapping.hf_param[role]: tensor for role, tensor in hf.items()}
        shards = [mapping.hf_to_megatron(hf, replace(_ctx(tp), tp_rank=r)) for r in range(tp)]
        for name, tensor in mapping.megatron_to_hf(shards, _ctx(tp)).items():
            assert torch.equal(materialize(tensor), sources[name]), (mapping, name, tp)
            assert _copied(tensor, 64) == _bytes(sources[name]), (mapping, name, tp)
