"""The export's safetensors writer: ``ShardLayout`` plans the files from shapes alone, ``LayoutWriter`` fills them,
one writer or several at once, and ``HFFolderWriter`` publishes them as an HF folder.

Two writers in one process stand for two TP ranks: each is given every tensor with the other's
parts as meta tensors. Parts are sized so that their boundaries fall inside 4 KiB blocks and runs
cross staging buffers (made small there), the cases where a direct write could clobber the other
writer's bytes. Through the folder: every dtype bit for bit, shard sizes, headers, the index, the
``O_DIRECT`` path and its fallbacks, and failures that leave nothing behind.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from bridge.mappings import JoinedShards
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bridge.hf import data_appender
from bridge.hf import layout as layout_module
from bridge.hf.data_appender import DIRECT_BLOCK
from bridge.hf.folder_writer import HFFolderWriter
from bridge.hf.layout import LayoutWriter, ShardLayout
from bridge.runtime.sizes import parse_size
from tests.checks import same_bits


@pytest.fixture
def small_stages(monkeypatch):
    monkeypatch.setattr(data_appender, "STAGE_BYTES", 16 * 2**10)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- the layout, and several writers filling it


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


@pytest.mark.usefixtures("small_stages")
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
    with pytest.raises(RuntimeError, match="shard-1.tmp: the writers wrote 72001 bytes of its 72000 data bytes"):
        layout.check_written([{0: sizes[0]}, {1: sizes[1] + 1, 2: sizes[2]}])


def test_stacked_slices_are_written_into_their_one_tensor_by_any_writer_in_any_order(tmp_path):
    """Slices ``name[i]`` (experts a family stores stacked, gpt-oss) are planned as one ``[n, ...]`` tensor: each writer
    writes the slices it holds at their offsets, in whatever order, and the file holds the stacked tensor."""
    gen = torch.Generator().manual_seed(1)
    experts = torch.randn(4, 24, 40, generator=gen).bfloat16()
    planned = [("before", torch.randn(7, generator=gen)), *((f"w[{e}]", experts[e]) for e in range(4)), ("after", torch.ones(3))]
    layout = ShardLayout([(name, _meta(t)) for name, t in planned], 10**9)
    assert layout.shapes() == {"before": (7,), "w": (4, 24, 40), "after": (3,)}
    layout.create(tmp_path)
    first, second = LayoutWriter(tmp_path, layout), LayoutWriter(tmp_path, layout)
    for name, tensor in [planned[0], planned[3], planned[1], planned[5]]:
        first.add(name, tensor)
    for name, tensor in [planned[4], planned[2]]:
        second.add(name, tensor)
    first.close()
    second.close()
    layout.check_written([first.written_bytes, second.written_bytes])
    (path,) = [tmp_path / f.name for f in layout.files]
    os.replace(path, tmp_path / "model.safetensors")
    assert same_bits(load_file(tmp_path / "model.safetensors")["w"], experts)


@pytest.mark.parametrize(
    "slices,message",
    [
        ([0, 2], r"tensor w: the export has slices \[0, 2\] of it, not 0 to 1"),
        ([0, 0], r"tensor w\[0\] is exported twice"),
    ],
)
def test_stacked_slices_that_do_not_make_a_whole_tensor_are_refused(slices, message):
    with pytest.raises(ValueError, match=message):
        ShardLayout([(f"w[{i}]", torch.empty(2, 3, device="meta")) for i in slices], 10**9)


def test_a_name_planned_twice_is_refused():
    norm = torch.empty(4, device="meta")
    with pytest.raises(ValueError, match="tensor x is exported twice"):
        ShardLayout([("x", norm), ("y", norm), ("x", norm)], 10**9)


# ---------------------------------------------------------------- through the folder

_CONFIG = {"architectures": ["LlamaForCausalLM"]}


def _write_tensors(out: Path, tensors: dict[str, torch.Tensor], max_shard_size="5GB") -> Path:
    """``tensors`` written as an HF folder at ``out`` by the export's writer, in the order given."""
    with HFFolderWriter(out, ShardLayout(list(tensors.items()), parse_size(max_shard_size))) as folder:
        for name, tensor in tensors.items():
            folder.add(name, tensor)
        folder.finish(_CONFIG, {})
    return out


def _raw_header(path: Path) -> tuple[int, dict]:
    """The header length N and the parsed JSON header of a safetensors file."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        text = handle.read(length)
    assert text.startswith(b"{") and text.rstrip(b" ").endswith(b"}"), "header is not JSON padded with spaces"
    return length, json.loads(text)


def _shards_in_order(out: Path) -> list[tuple[Path, int, dict]]:
    """Every shard of ``out`` (N, header), checked against the index and the safetensors layout rules."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    result = []
    for path in shards:
        length, header = _raw_header(path)
        assert header.pop("__metadata__") == {"format": "pt"}
        assert (8 + length) % DIRECT_BLOCK == 0, "data does not start on a block boundary"
        spans = sorted(tuple(info["data_offsets"]) for info in header.values())
        end = 0
        for begin, stop in spans:  # the data is covered exactly and contiguously
            assert begin == end and stop >= begin
            end = stop
        assert path.stat().st_size == 8 + length + end
        assert sorted(name for name, shard in index["weight_map"].items() if shard == path.name) == sorted(header)
        result.append((path, length, header))
    return result


def _dtypes() -> list[torch.dtype]:
    names = [
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
        "uint16",
        "uint32",
        "uint64",
        "complex64",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    ]
    return [getattr(torch, name) for name in names if hasattr(torch, name)]


def _random(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Random bits of ``dtype`` (any byte pattern, NaNs included: compared bit for bit)."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape, itemsize), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape) if shape else raw.view(dtype).reshape(())


def test_writer_files_load_in_safetensors_bit_for_bit_for_every_dtype_and_odd_shapes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for dtype in _dtypes():
        label = str(dtype).removeprefix("torch.")
        tensors[f"{label}.matrix"] = _random((3, 7), dtype, generator)  # odd byte counts: unaligned offsets follow
        if label != "float4_e2m1fn_x2":  # two 4-bit values per element: safetensors has no 0-d shape for it
            tensors[f"{label}.scalar"] = _random((), dtype, generator)
        tensors[f"{label}.empty"] = torch.empty((0, 4), dtype=dtype)
        tensors[f"{label}.transposed"] = _random((4, 6), dtype, generator).t()
        tensors[f"{label}.column"] = _random((5, 5), dtype, generator)[:, 2]  # strided view into a larger storage
        tensors[f"{label}.rows"] = _random((8, 3), dtype, generator)[2:5]  # contiguous view into a larger storage
    tensors["empty.middle"] = torch.empty((2, 0, 3), dtype=torch.bfloat16)
    out = _write_tensors(tmp_path / "out", tensors, max_shard_size="2KB")
    shards = _shards_in_order(out)
    assert len(shards) > 1
    loaded = {}
    for path, _, header in shards:
        loaded.update(load_file(str(path)))
        with safe_open(str(path), framework="pt") as handle:
            for name in header:
                assert same_bits(handle.get_tensor(name), tensors[name]), name
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert same_bits(loaded[name], tensor), name
    # dtype names and shapes are the ones safetensors itself writes
    written = {name: info for _, _, header in shards for name, info in header.items()}
    for dtype in _dtypes():
        name = f"{str(dtype).removeprefix('torch.')}.matrix"
        reference = tmp_path / "reference.safetensors"
        save_file({name: tensors[name]}, str(reference))
        expected = _raw_header(reference)[1][name]
        assert (written[name]["dtype"], written[name]["shape"]) == (expected["dtype"], expected["shape"]), dtype


def test_writer_refuses_a_dtype_safetensors_cannot_name(tmp_path):
    with pytest.raises(ValueError, match=r"tensor model\.norm\.weight has dtype torch\.complex128"):
        _write_tensors(tmp_path / "out", {"a": torch.ones(2), "model.norm.weight": torch.ones(2, dtype=torch.complex128)})
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_writer_streams_each_tensor_to_disk_when_added(tmp_path):
    tensor = torch.arange(10 * 2**20, dtype=torch.float32)  # 40 MiB: several times the staging buffers
    held = 2 * data_appender.STAGE_BYTES  # one stage being filled, one being written
    with HFFolderWriter(tmp_path / "out", ShardLayout([("a", tensor), ("b", tensor)], 10**9)) as folder:
        shard = folder.tmp_dir / "shard-0.tmp"
        assert _allocated(shard) < held, "the file was filled before any tensor was written"
        folder.add("a", tensor)
        assert _allocated(shard) >= tensor.nbytes - held, "the tensor was buffered instead of written"
        folder.add("b", tensor)
        assert _allocated(shard) >= 2 * tensor.nbytes - held
        with pytest.raises(ValueError, match="tensor a was written twice"):
            folder.add("a", tensor)
        folder.finish(_CONFIG, {})
    ((path, _, header),) = _shards_in_order(tmp_path / "out")
    assert list(header) == ["a", "b"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _allocated(path: Path) -> int:
    """Bytes of disk ``path`` takes (its files are created at their final size, with holes where no data was written yet)."""
    return os.stat(path).st_blocks * 512


def test_a_tensor_the_layout_did_not_plan_or_one_never_written_publishes_nothing(tmp_path):
    tensors = {"a": torch.ones(3), "b": torch.zeros(5, dtype=torch.int8)}
    with HFFolderWriter(tmp_path / "out", ShardLayout(list(tensors.items()), 10**9)) as folder:
        with pytest.raises(ValueError, match=r"tensor a is \[3\] torch.float64; the export planned \[3\] torch.float32"):
            folder.add("a", torch.ones(3, dtype=torch.float64))
        folder.add("a", tensors["a"])
        with pytest.raises(RuntimeError, match="shard-0.tmp: the writers wrote 12 bytes of its 17 data bytes"):
            folder.finish(_CONFIG, {})
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_shards_hold_at_most_max_shard_size_data_bytes_unless_one_tensor_is_larger(tmp_path):
    generator = torch.Generator().manual_seed(1)
    limit = 10_000
    tensors = {"half.a": torch.zeros(limit // 4, dtype=torch.int16), "half.b": torch.ones(limit // 4, dtype=torch.int16)}
    for i in range(60):
        elements = int(torch.randint(1, 1500, (), generator=generator))
        tensors[f"layer.{i}.weight"] = torch.randn(elements, generator=generator).to(torch.bfloat16)
        if i == 30:
            tensors["big.weight"] = torch.randn(6000, generator=generator)  # 24 kB: alone in its shard
    tensors["exactly.the.limit"] = torch.zeros(limit // 2, dtype=torch.float16)
    out = _write_tensors(tmp_path / "out", tensors, max_shard_size=limit)
    shards = _shards_in_order(out)
    assert len(shards) > 5
    data = [sum(info["data_offsets"][1] - info["data_offsets"][0] for info in header.values()) for _, _, header in shards]
    for (path, _, header), size in zip(shards, data):
        assert size <= limit or len(header) == 1, (path.name, size)
    assert any(list(header) == ["big.weight"] for _, _, header in shards)
    assert sorted(shards[0][2]) == ["half.a", "half.b"] and data[0] == limit  # a shard may fill up to the limit exactly
    assert list(shards[-1][2]) == ["exactly.the.limit"] and data[-1] == limit
    # shards close only when the next tensor would not fit, and keep the order the tensors came in
    order = [name for _, _, header in shards for name in sorted(header, key=lambda n: header[n]["data_offsets"])]
    assert order == list(tensors)
    for size, (_, _, following) in zip(data, shards[1:]):
        first = min(following, key=lambda n: following[n]["data_offsets"])
        assert size + tensors[first].nbytes > limit, f"a shard of {size} bytes was closed before {first} ({tensors[first].nbytes} bytes)"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {
        "total_size": sum(t.nbytes for t in tensors.values()),
        "total_parameters": sum(t.numel() for t in tensors.values()),
    }
    for path, _, _ in shards:
        for name, tensor in load_file(str(path)).items():
            assert torch.equal(tensor, tensors[name]), name


def test_a_large_header_is_laid_out_exactly_and_one_over_what_safetensors_reads_is_refused(tmp_path, monkeypatch):
    """5,000 tensors of a few bytes and a 20,000-character name: the headers are far larger than their
    shards' data, and still exact: the data starts on the block after the header, and every tensor loads."""
    tensors = {"x" * 20_000: torch.ones(2, dtype=torch.bfloat16)}
    tensors.update({f"model.layers.{i}.tiny.weight": torch.full((i % 3,), i, dtype=torch.int32) for i in range(5000)})
    tensors["model.after.long.name"] = torch.ones(1)
    out = _write_tensors(tmp_path / "out", tensors, max_shard_size="10KB")
    shards = _shards_in_order(out)
    assert len(shards) == 3  # 20,004 data bytes: shards start by data bytes alone, whatever their headers' size
    for path, length, header in shards:
        exact = len(json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")))
        assert exact <= length < exact + DIRECT_BLOCK
    loaded = {}
    for path, _, _ in shards:
        loaded.update(load_file(str(path)))
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    monkeypatch.setattr(layout_module, "MAX_HEADER_BYTES", 200_000)
    with pytest.raises(ValueError, match="a safetensors header of 237560 bytes is over the 200000 that safetensors reads"):
        _write_tensors(tmp_path / "over", tensors, max_shard_size="10KB")
    assert not (tmp_path / "over").exists() and not list(tmp_path.glob(".over.*"))


def _direct_io_tensors() -> dict[str, torch.Tensor]:
    """Sizes that cross the staging buffer and block boundaries at odd places, and an empty tensor."""
    generator = torch.Generator().manual_seed(3)
    return {
        "odd.weight": torch.randn(1001, 7, generator=generator),
        "empty.weight": torch.zeros(0, 5),
        "large.weight": torch.randn(5 * 2**20 + 3, generator=generator).to(torch.bfloat16),  # ~10 MiB
        "more.weight": torch.randn(3 * 2**20 + 11, generator=generator),  # ~12 MiB: the stage fills mid-tensor, twice
        "tail.weight": torch.arange(3, dtype=torch.int8),
    }


def _shard_bytes(out: Path) -> list[bytes]:
    return [path.read_bytes() for path, _, _ in _shards_in_order(out)]


def test_direct_io_and_page_cache_writes_give_the_same_files(tmp_path, monkeypatch):
    tensors = _direct_io_tensors()
    used = []
    original = data_appender.DataAppender.finish
    monkeypatch.setattr(data_appender.DataAppender, "finish", lambda self: (used.append(self.direct), original(self))[1])
    direct = _write_tensors(tmp_path / "direct", tensors, max_shard_size="20MB")
    if hasattr(os, "O_DIRECT"):
        assert any(used), "O_DIRECT was not used on this filesystem"
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    used.clear()
    buffered = _write_tensors(tmp_path / "buffered", tensors, max_shard_size="20MB")
    assert used and not any(used)
    assert len(_shard_bytes(direct)) == 2 and _shard_bytes(direct) == _shard_bytes(buffered)
    loaded = {}
    for path, _, _ in _shards_in_order(direct):
        loaded.update(load_file(path))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_a_filesystem_that_refuses_direct_writes_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    import fcntl

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    tensors = _direct_io_tensors()
    reference = _write_tensors(tmp_path / "reference", tensors, max_shard_size="20MB")
    refused = []
    pwrite = os.pwrite

    def refusing_pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    out = _write_tensors(tmp_path / "refused", tensors, max_shard_size="20MB")
    assert refused
    assert _shard_bytes(out) == _shard_bytes(reference)


def test_a_failed_background_write_fails_the_export_and_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    original = data_appender.write_all

    def disk_full(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (test)")
        return original(fd, data, offset)

    monkeypatch.setattr(data_appender, "write_all", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _write_tensors(tmp_path / "out", {"a": torch.arange(6 * 2**20, dtype=torch.float32)})
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
