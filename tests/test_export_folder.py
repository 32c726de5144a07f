"""Exported HF folders: complete (config, generation config, tokenizer, shards, index), consistent
(vocab rows, tied lm_head, both config spellings), loadable by transformers with an empty load
report, and written atomically — a killed export leaves the target absent or untouched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bridge.checks.verify import check_loads_in_transformers, compare_hf_folders, load_hf_tensors, transformers_load_report
from bridge.hf import metadata as export_metadata
from bridge.hf.metadata import ConfigMismatchError
from bridge.hf.output_folder import OutputFolderError, temp_name
from bridge.hf.writer import STAGE_BYTES, ExportCheckError, HFFolderWriter
from tests.checks import same_bits
from tests.edited_checkpoints import edited_copy

ROOT = Path(__file__).resolve().parent.parent


def _write(source: Path, out: Path, *, max_shard_size="5GB", overwrite=False, tensors=None, config=None, check=None) -> Path:
    """Write ``source``'s tensors (or ``tensors``) and metadata to ``out`` the way an export does."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(source)
    tensors = load_hf_tensors(source) if tensors is None else tensors
    with HFFolderWriter(out, max_shard_size=max_shard_size, overwrite=overwrite) as folder:
        for name, tensor in tensors.items():
            folder.add(name, tensor)
        folder.finish(
            config or export_metadata.export_config(source, hf_config, None),
            export_metadata.side_files(source, hf_config),
            check=check,
        )
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------- contents


def test_folder_has_shards_index_metadata_and_side_files(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["llama"]
    out = _write(source, tmp_path / "out", max_shard_size="50KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert sorted(index["weight_map"]) == sorted(load_hf_tensors(source))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in load_hf_tensors(source).values())
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
        assert (out / shard).stat().st_mode & 0o777 == 0o666 & ~_umask()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert compare_hf_folders(source, out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(
        shards + ["config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    )
    assert not list(tmp_path.glob(".out.*"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_config_carries_new_and_old_keys_with_the_same_meaning(tiny_checkpoints):
    from transformers import AutoConfig

    source = tiny_checkpoints["llama3.1"]  # llama3 rope scaling
    hf_config = AutoConfig.from_pretrained(source)
    config = export_metadata.export_config(source, hf_config, None)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 250
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    rope = config["rope_parameters"]
    assert config["rope_theta"] == rope["rope_theta"] == 500000.0
    assert (
        config["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"} and config["rope_scaling"]["rope_type"] == "llama3"
    )
    assert config["tie_word_embeddings"] is False
    # transformers 5 reads the two spellings as one and the same config
    reread = AutoConfig.from_dict(config) if hasattr(AutoConfig, "from_dict") else None
    if reread is None:
        reread = type(hf_config).from_dict(config)
    skip = export_metadata.VOLATILE_CONFIG_KEYS
    assert {k: v for k, v in reread.to_dict().items() if k not in skip} == {k: v for k, v in hf_config.to_dict().items() if k not in skip}
    assert export_metadata.export_config(source, hf_config, torch.float32)["torch_dtype"] == "float32"
    plain = export_metadata.export_config(tiny_checkpoints["llama"], AutoConfig.from_pretrained(tiny_checkpoints["llama"]), None)
    assert plain["rope_theta"] == 10000.0 and "rope_scaling" not in plain


@pytest.mark.parametrize("name", ["llama", "llama3.2", "qwen2"])
def test_lm_head_is_written_exactly_when_untied(tiny_checkpoints, tmp_path, name):
    source = tiny_checkpoints[name]
    tied = json.loads((source / "config.json").read_text())["tie_word_embeddings"]
    tensors = load_hf_tensors(source)
    assert ("lm_head.weight" in tensors) == (not tied)
    out = _write(source, tmp_path / "out", check=check_loads_in_transformers)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert ("lm_head.weight" in index) == (not tied)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == tied
    # and the writer refuses the wrong combination, leaving nothing behind
    wrong = dict(tensors)
    if tied:
        wrong["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    else:
        del wrong["lm_head.weight"]
    with pytest.raises(ConfigMismatchError, match="tie_word_embeddings"):
        _write(source, tmp_path / "wrong", tensors=wrong)
    assert not (tmp_path / "wrong").exists() and not list(tmp_path.glob(".wrong.*"))


def test_padded_vocabulary_is_refused(tiny_checkpoints, tmp_path):
    tensors = load_hf_tensors(tiny_checkpoints["llama"])
    tensors["model.embed_tokens.weight"] = torch.cat([tensors["model.embed_tokens.weight"], torch.zeros(6, 64, dtype=torch.bfloat16)])
    with pytest.raises(ConfigMismatchError, match=r"model\.embed_tokens\.weight has 256 rows but config\.json says vocab_size=250"):
        _write(tiny_checkpoints["llama"], tmp_path / "out", tensors=tensors)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- transformers load check


def test_load_check_passes_on_a_good_folder_and_names_every_problem(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["qwen3"]
    assert all(not v for v in transformers_load_report(source).values())
    check_loads_in_transformers(source)
    missing = edited_copy(source, tmp_path / "missing", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(ExportCheckError, match=r"missing_keys: model\.layers\.1\.self_attn\.k_norm\.weight"):
        check_loads_in_transformers(missing)
    extra = edited_copy(source, tmp_path / "extra", lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2, 2)))
    with pytest.raises(ExportCheckError, match=r"unexpected_keys: model\.layers\.0\.mlp\.extra\.weight"):
        check_loads_in_transformers(extra)
    shape = edited_copy(source, tmp_path / "shape", lambda t: t.__setitem__("model.norm.weight", torch.ones(32, dtype=torch.bfloat16)))
    with pytest.raises(ExportCheckError, match=r"(mismatched_keys|load_error): .*model\.norm\.weight"):
        check_loads_in_transformers(shape)


def test_a_failed_check_publishes_nothing(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["llama"]

    def refuse(folder: Path) -> None:
        assert (folder / "config.json").exists() and (folder / "model.safetensors.index.json").exists()
        raise ExportCheckError("refused")

    with pytest.raises(ExportCheckError):
        _write(source, tmp_path / "new", check=refuse)
    assert not (tmp_path / "new").exists()
    existing = _write(source, tmp_path / "old", max_shard_size="50KB")
    before = _snapshot(existing)
    with pytest.raises(ExportCheckError):
        _write(tiny_checkpoints["qwen3"], existing, overwrite=True, check=refuse)
    assert _snapshot(existing) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


# ---------------------------------------------------------------- overwrite and leftovers


@pytest.mark.parametrize("atomic_swap", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_overwrite_replaces_the_whole_folder_and_refuses_unrelated_ones(tiny_checkpoints, tmp_path, monkeypatch, atomic_swap):
    if not atomic_swap:  # platforms without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr("bridge.hf.output_folder._exchange", lambda a, b: False)
    source = tiny_checkpoints["llama"]
    out = _write(source, tmp_path / "out", max_shard_size="20KB")
    assert len(list(out.glob("*.safetensors"))) > 5
    with pytest.raises(OutputFolderError, match="not empty"):
        _write(source, out)
    _write(source, out, overwrite=True)
    assert [p.name for p in out.glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]  # no stale shards
    assert compare_hf_folders(source, out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder is gone too
    unrelated = tmp_path / "home"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep")
    with pytest.raises(OutputFolderError, match="holds 'notes.txt'"):
        _write(source, unrelated, overwrite=True)
    assert (unrelated / "notes.txt").read_text() == "keep"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="not a folder"):
        _write(source, tmp_path / "file")


@pytest.mark.distributed
def test_leftovers_of_dead_processes_are_removed(tiny_checkpoints, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    stale = Path(str(temp_name(out)).replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    live = temp_name(out)  # named after this (running) process: another export in progress
    for folder in (stale, live):
        folder.mkdir()
        (folder / "shard-0.tmp").write_bytes(b"partial")
    _write(tiny_checkpoints["llama"], out)
    assert not stale.exists() and live.exists()


# ---------------------------------------------------------------- killed exports


@pytest.fixture(scope="module")
def larger_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A larger tiny Llama and its Megatron checkpoint, imported by a plain `python -m bridge import --tp 2 --in-memory`
    (which starts its two ranks itself; the exports below stream in one process)."""
    from bridge.tiny_checkpoints import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("larger")
    hf = build_tiny_checkpoint("llama", root / "hf", hidden_size=128, intermediate_size=512, num_attention_heads=4, vocab_size=2000)
    ckpt = root / "ckpt"
    result = _hfmb("import", str(hf), str(ckpt), "--tp", "2", "--in-memory")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting 2 local ranks" in result.stderr and "imported LlamaForCausalLM" in result.stdout
    return hf, ckpt


def _env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONWARNINGS": "ignore"}


def _hfmb(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bridge", *argv], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)


def _kill_mid_export(ckpt: Path, out: Path, *extra: str) -> None:
    """Start `hfmb export`, SIGKILL it once its temporary folder beside ``out`` holds a shard; assert it was killed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "export", str(ckpt), str(out), "--max-shard-size", "64KB", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        cwd=ROOT,
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            temps = list(out.parent.glob(f".{out.name}.tmp-*-{proc.pid}-*"))
            if temps and list(temps[0].glob("shard-*")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and time.time() >= deadline:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the export was not killed mid-way (exit {proc.returncode})"


@pytest.mark.distributed
def test_killed_export_leaves_the_target_absent_or_untouched(larger_checkpoint, tmp_path):
    hf, ckpt = larger_checkpoint
    out = tmp_path / "out"
    _kill_mid_export(ckpt, out)
    assert not out.exists()
    # a folder already there (an earlier export) survives a killed --overwrite byte for byte
    _write(hf, out)
    before = _snapshot(out)
    _kill_mid_export(ckpt, out, "--overwrite")
    assert _snapshot(out) == before
    # a completed export replaces it, and the killed runs' temporary folders are cleaned up
    result = _hfmb("export", str(ckpt), str(out), "--overwrite", "--max-shard-size", "64KB")
    assert result.returncode == 0, result.stderr[-3000:]
    assert compare_hf_folders(hf, out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------- the streaming shard writer

_CONFIG = {"architectures": ["LlamaForCausalLM"]}


def _write_tensors(out: Path, tensors: dict[str, torch.Tensor], max_shard_size="5GB") -> Path:
    with HFFolderWriter(out, max_shard_size=max_shard_size) as folder:
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
        assert (8 + length) % 8 == 0, "data does not start 8-byte aligned"
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
    from safetensors.torch import load_file, save_file

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
    held = 2 * STAGE_BYTES  # one stage being filled, one being written
    with HFFolderWriter(tmp_path / "out") as folder:
        folder.add("a", tensor)
        shard = folder.tmp_dir / "shard-0.tmp"
        assert shard.stat().st_size >= tensor.nbytes - held, "the tensor was buffered instead of written"
        folder.add("b", tensor)
        assert shard.stat().st_size >= 2 * tensor.nbytes - held
        with pytest.raises(ValueError, match="tensor a was written twice"):
            folder.add("a", tensor)
        folder.finish(_CONFIG, {})
    ((path, _, header),) = _shards_in_order(tmp_path / "out")
    assert list(header) == ["a", "b"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_shards_hold_at_most_max_shard_size_data_bytes_unless_one_tensor_is_larger(tmp_path):
    from safetensors.torch import load_file

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


def test_many_tiny_tensors_outgrow_the_header_reservation(tmp_path):
    """5,000 tensors of a few bytes: each shard's header fills its reservation long before its data fills
    the shard, so the writer starts new shards (with growing reservations) rather than writing a wrong file."""
    from safetensors.torch import load_file

    tensors = {"x" * 20_000: torch.ones(2, dtype=torch.bfloat16)}  # a header entry larger than the first reservation
    tensors.update({f"model.layers.{i}.tiny.weight": torch.full((i % 3,), i, dtype=torch.int32) for i in range(5000)})
    tensors["model.after.long.name"] = torch.ones(1)
    out = _write_tensors(tmp_path / "out", tensors, max_shard_size="1MB")
    shards = _shards_in_order(out)
    assert 2 < len(shards) <= 12, len(shards)  # overflowed, and reservations grew instead of making ~100 shards
    for path, length, header in shards:
        assert length >= len(json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")))
    assert any("x" * 20_000 in header for _, _, header in shards)
    loaded = {}
    for path, _, _ in shards:
        loaded.update(load_file(str(path)))
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


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
    from safetensors.torch import load_file

    import bridge.hf.writer as hf_writer

    tensors = _direct_io_tensors()
    used = []
    original = hf_writer.DataAppender.finish
    monkeypatch.setattr(hf_writer.DataAppender, "finish", lambda self: (used.append(self.direct), original(self))[1])
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
    from bridge.hf import writer as hf_writer

    calls = []
    original = hf_writer.write_all

    def disk_full(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (test)")
        return original(fd, data, offset)

    monkeypatch.setattr(hf_writer, "write_all", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _write_tensors(tmp_path / "out", {"a": torch.arange(6 * 2**20, dtype=torch.float32)})
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
