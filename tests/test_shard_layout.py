"""``ShardLayout`` and ``LayoutWriter``: files planned from shapes alone, written by several writers, each its own parts.

Two writers in one process stand for two TP ranks: each is given every tensor with the other's
parts as meta tensors. Parts are sized so that their boundaries fall inside 4 KiB blocks and runs
cross staging buffers (made small here), the cases where a direct write could clobber the other
writer's bytes.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from bridge.mappings import JoinedShards
from safetensors.torch import load_file

from bridge.hf import writer as hf_writer
from bridge.hf.layout import LayoutWriter, ShardLayout


@pytest.fixture(autouse=True)
def small_stages(monkeypatch):
    monkeypatch.setattr(hf_writer, "STAGE_BYTES", 16 * 2**10)


def _tensors() -> dict[str, JoinedShards | torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    joined_rows = JoinedShards([torch.randn(37, 53, generator=gen).bfloat16(), torch.randn(41, 53, generator=gen).bfloat16()], 0)
    joined_cols = JoinedShards([torch.randn(300, 29, generator=gen), torch.randn(300, 31, generator=gen)], 1)
    return {
        "a.rows": joined_rows,  # ~8 KiB, boundary mid-block
        "b.norm": torch.randn(53, generator=gen).bfloat16(),
        "c.cols": joined_cols,  # a dim-1 join: one writer writes it whole
        "d.big": JoinedShards([torch.randn(9001, generator=gen), torch.randn(12345, generator=gen)], 0),  # crosses stages
    }


def _meta(tensor):
    if isinstance(tensor, JoinedShards):
        return JoinedShards([part.to("meta") for part in tensor.parts], tensor.dim)
    return tensor.to("meta")


def _share(tensor, writer: int, whole_by: int):
    """What ``writer`` holds of ``tensor``: its own part of a dim-0 join, else all of it if it is ``whole_by``."""
    if isinstance(tensor, JoinedShards) and tensor.dim == 0:
        return JoinedShards([part if i == writer else part.to("meta") for i, part in enumerate(tensor.parts)], 0)
    return tensor if writer == whole_by else None


@pytest.mark.parametrize("max_shard_bytes", [10**9, 20_000])
def test_two_writers_make_the_files_one_writer_makes(tmp_path, max_shard_bytes):
    tensors = _tensors()
    layout = ShardLayout([(name, _meta(t)) for name, t in tensors.items()], max_shard_bytes)
    assert len(layout.files) == (1 if max_shard_bytes > 10**6 else 3)
    folders = {"one": tmp_path / "one", "two": tmp_path / "two"}
    for folder in folders.values():
        folder.mkdir()
        layout.create(folder)
    single = LayoutWriter(folders["one"], layout)
    for name, tensor in tensors.items():
        single.add(name, tensor)
    single.close()
    writers = [LayoutWriter(folders["two"], layout) for _ in range(2)]
    for index, (name, tensor) in enumerate(tensors.items()):  # both writers interleaved, as concurrent ranks would be
        for writer_rank in (1, 0):
            share = _share(tensor, writer_rank, whole_by=index % 2)
            if share is not None:
                writers[writer_rank].add(name, share)
    for writer in writers:
        writer.close()

    written = {}
    for file in layout.files:
        one, two = (folders["one"] / file.name).read_bytes(), (folders["two"] / file.name).read_bytes()
        assert one == two and len(one) == file.size
        (length,) = struct.unpack("<Q", one[:8])
        assert (8 + length) % 4096 == 0  # data starts on a block boundary
        json.loads(one[8 : 8 + length])
        written.update(load_file(folders["two"] / file.name))
    assert set(written) == set(tensors)
    for name, tensor in tensors.items():
        expected = tensor.materialize() if isinstance(tensor, JoinedShards) else tensor
        assert torch.equal(written[name], expected), name


def test_a_tensor_that_does_not_match_the_plan_or_lacks_parts_is_refused(tmp_path):
    tensors = _tensors()
    layout = ShardLayout([(name, _meta(t)) for name, t in tensors.items()], 10**9)
    layout.create(tmp_path)
    writer = LayoutWriter(tmp_path, layout)
    with pytest.raises(ValueError, match="b.norm is \\[53\\] torch.float32; the export planned \\[53\\] torch.bfloat16"):
        writer.add("b.norm", tensors["b.norm"].float())
    with pytest.raises(ValueError, match="not among the tensors the export planned"):
        writer.add("z.unknown", tensors["b.norm"])
    cols = tensors["c.cols"]
    with pytest.raises(ValueError, match="c.cols: a join along dim 1 cannot be written part by part"):
        writer.add("c.cols", JoinedShards([cols.parts[0], cols.parts[1].to("meta")], 1))
    writer.abort()


def test_files_whose_bytes_the_writers_do_not_add_up_to_are_refused():
    layout = ShardLayout([(name, _meta(t)) for name, t in _tensors().items()], 20_000)
    sizes = [file.size - len(file.header) for file in layout.files]
    layout.check_written([{0: sizes[0]}, {1: sizes[1], 2: sizes[2]}])
    with pytest.raises(RuntimeError, match="layout-1.tmp: the ranks wrote 72001 bytes of its 72000 data bytes"):
        layout.check_written([{0: sizes[0]}, {1: sizes[1] + 1, 2: sizes[2]}])


def test_a_name_planned_twice_is_refused():
    norm = torch.empty(4, device="meta")
    with pytest.raises(ValueError, match="tensor x is exported twice"):
        ShardLayout([("x", norm), ("y", norm), ("x", norm)], 10**9)
