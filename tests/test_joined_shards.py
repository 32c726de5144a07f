"""``JoinedShards``: export's unjoined tensors give exactly the bytes of the joined tensor, and the writer writes them so."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mappings import ColumnParallelMapping, GatedMLPMapping, JoinedShards, MappingContext, QKVMapping, RowParallelMapping, VocabParallelMapping, materialize


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _shards(shape: tuple[int, ...], count: int, dim: int, dtype=torch.bfloat16) -> tuple[torch.Tensor, list[torch.Tensor]]:
    full = torch.randn(shape).to(dtype)
    return full, [part.contiguous() for part in full.chunk(count, dim=dim)]


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("max_bytes", [1, 100, 10**9])
def test_blocks_are_the_joined_bytes_in_order(dim, max_bytes):
    full, shards = _shards((37, 12), 3 if dim == 0 else 4, dim)
    joined = JoinedShards(shards, dim)
    assert joined.shape == full.shape and joined.nbytes == full.nbytes and joined.numel() == full.numel()
    assert torch.equal(joined.materialize(), full)
    blocks = list(joined.blocks(max_bytes))
    assert all(block.is_contiguous() for block in blocks)
    assert b"".join(_bytes(block) for block in blocks) == _bytes(full)
    if dim == 0:  # parts of a dim-0 join are written as they are, never copied
        assert [block.data_ptr() for block in blocks] == [shard.data_ptr() for shard in shards]


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
        (QKVMapping("qkv", q="q", k="k", v="v"), {"q": torch.randn(32, hidden), "k": torch.randn(16, hidden), "v": torch.randn(16, hidden)}),
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
            blocks = tensor.blocks(64) if isinstance(tensor, JoinedShards) else [tensor]
            assert b"".join(_bytes(block) for block in blocks) == _bytes(sources[name]), (mapping, name, tp)


def test_the_writer_writes_joined_shards_as_the_joined_tensor(tmp_path):
    from safetensors.torch import load_file

    from bridge.hf_writer import ShardSequenceWriter

    rows, shards = _shards((64, 48), 2, 0)
    cols, col_shards = _shards((64, 48), 4, 1)
    writer = ShardSequenceWriter(tmp_path, max_shard_bytes=10**9)
    writer.add("rows", JoinedShards(shards, 0))
    writer.add("cols", JoinedShards(col_shards, 1))
    writer.add("plain", rows)
    written = writer.close()
    loaded = load_file(tmp_path / written.files[0])
    assert torch.equal(loaded["rows"], rows) and torch.equal(loaded["cols"], cols) and torch.equal(loaded["plain"], rows)
    assert written.shapes == {"rows": (64, 48), "cols": (64, 48), "plain": (64, 48)}
