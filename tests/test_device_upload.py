"""PinnedUpload: the staged copy a GPU load uses, block by block through reused host buffers.

On the CPU the buffers are plain memory (the path a CUDA parameter takes, less pinning and events);
the test on CUDA runs where a GPU is present. The whole load through this path is checked shard by
shard for every model and layout in test_roundtrip (``staged=True``).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from bridge.mappings import MappingContext, QKVMapping

from bridge.engine.device_upload import PinnedUpload


def _source(rows: int, cols: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(rows, cols, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("block_bytes", [1, 20, 21, 60, 10_000])  # under a row, one row, a row and a bit, 3 rows, all
def test_blocks_of_rows_land_where_they_belong(block_bytes):
    src = _source(7, 10)  # rows of 20 bytes
    dest = torch.full((7, 10), float("nan"), dtype=torch.bfloat16)
    upload = PinnedUpload(pin=False, block_bytes=block_bytes)
    upload.copy(dest, src)
    upload.finish()
    assert torch.equal(dest, src)
    assert upload.uploaded == src.nbytes
    assert sum(buffer is not None for buffer in upload._buffers) <= 2
    assert max(buffer.numel() for buffer in upload._buffers if buffer is not None) == max(block_bytes, 20)  # a block, or a row


def test_small_blocks_share_a_buffer_and_full_ones_alternate():
    upload = PinnedUpload(pin=False, block_bytes=1000)
    sources = [_source(3, 10) for _ in range(6)]  # 60 bytes each, placed 64 bytes apart: 15 to a buffer
    dests = [torch.empty(3, 10, dtype=torch.bfloat16) for _ in sources]
    for dest, src in zip(dests, sources):
        upload.copy(dest, src)
    assert upload._buffers[1] is None  # all in the first buffer
    big = _source(40, 10)  # 800 bytes: no room left in the first, so into the second
    upload.copy(torch.empty(40, 10, dtype=torch.bfloat16), big)
    assert upload._buffers[1] is not None and upload._current == 1
    upload.finish()
    assert all(torch.equal(dest, src) for dest, src in zip(dests, sources))


def test_views_conversions_and_expanded_rows():
    upload = PinnedUpload(pin=False, block_bytes=64)
    base = _source(12, 9, torch.float32)
    view = base.t()[2:8]  # non-contiguous rows
    dest = torch.empty(6, 12, dtype=torch.bfloat16)
    upload.copy(dest, view)
    assert torch.equal(dest, view.to(torch.bfloat16))  # converted on the host, as copy_ converts
    zeros = torch.zeros(1, 5, dtype=torch.bfloat16).expand(30, 5)  # the padded vocab rows: one row in memory
    dest = torch.ones(30, 5, dtype=torch.bfloat16)
    upload.copy(dest, zeros)
    assert torch.equal(dest, torch.zeros(30, 5, dtype=torch.bfloat16))
    one_d = torch.arange(100, dtype=torch.float32)
    dest = torch.empty(100)
    upload.copy(dest, one_d)
    assert torch.equal(dest, one_d)
    with pytest.raises(ValueError, match=r"shape \[3, 4\] into one of shape \[4, 3\]"):
        upload.copy(torch.empty(4, 3), torch.empty(3, 4))


def test_mapping_builds_the_same_shard_through_the_copy_hook():
    ctx = MappingContext(tp_rank=1, tp_size=2, num_attention_heads=4, num_query_groups=2, head_dim=3, vocab_size=10, padded_vocab_size=10)
    hf = {"q": _source(12, 6), "k": _source(6, 6), "v": _source(6, 6)}
    mapping = QKVMapping("decoder.layers.*.self_attention.linear_qkv.weight", q="q", k="k", v="v")
    for rank in range(2):
        direct = mapping.hf_to_megatron(hf, replace(ctx, tp_rank=rank), out=torch.empty(12, 6, dtype=torch.bfloat16))
        staged = torch.empty(12, 6, dtype=torch.bfloat16)
        upload = PinnedUpload(pin=False, block_bytes=30)
        mapping.hf_to_megatron(hf, replace(ctx, tp_rank=rank), out=staged, copy=upload.copy)
        assert torch.equal(staged, direct)


@pytest.mark.gpu
def test_pinned_non_blocking_copies_to_cuda():
    upload = PinnedUpload.for_device(torch.device("cuda"))
    assert upload.pin
    upload.block_bytes = 4096  # many blocks, each buffer refilled only after its last copy is done
    sources = [_source(64 + i, 96) for i in range(6)]
    dests = [torch.empty(s.shape, dtype=s.dtype, device="cuda") for s in sources]
    for dest, src in zip(dests, sources):
        upload.copy(dest, src)
    upload.finish()
    assert all(buffer.is_pinned() for buffer in upload._buffers if buffer is not None)
    for dest, src in zip(dests, sources):
        assert torch.equal(dest.cpu(), src)
