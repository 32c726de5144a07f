"""Exported HF folders: complete (config, generation config, tokenizer, shards, index), consistent
(vocab rows, tied lm_head, both config spellings), loadable by transformers with an empty load
report, and written atomically — a killed export leaves the target absent or untouched.
"""

from __future__ import annotations

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

from bridge.checks.verify import (
    ExportCheckError,
    check_loads_in_transformers,
    compare_hf_folders,
    load_hf_tensors,
    transformers_load_report,
)
from bridge.hf import metadata as export_metadata
from bridge.hf.folder_writer import HFFolderWriter
from bridge.hf.layout import ShardLayout
from bridge.hf.metadata import ConfigMismatchError
from bridge.hf.output_folder import OutputFolderError, temp_name
from bridge.runtime.sizes import parse_size
from tests.commands import HFMB, ROOT, clean_env, hfmb
from tests.edited_checkpoints import edited_copy


def _write(source: Path, out: Path, *, max_shard_size="5GB", overwrite=False, tensors=None, config=None, check=None) -> Path:
    """Write ``source``'s tensors (or ``tensors``) and metadata to ``out`` the way an export does."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(source)
    tensors = load_hf_tensors(source) if tensors is None else tensors
    with HFFolderWriter(out, ShardLayout(list(tensors.items()), parse_size(max_shard_size)), overwrite=overwrite) as folder:
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
    from tests.tiny_checkpoints import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("larger")
    hf = build_tiny_checkpoint("llama", root / "hf", hidden_size=128, intermediate_size=512, num_attention_heads=4, vocab_size=2000)
    ckpt = root / "ckpt"
    result = hfmb("import", str(hf), str(ckpt), "--tp", "2", "--in-memory")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting 2 local ranks" in result.stderr and "imported LlamaForCausalLM" in result.stdout
    return hf, ckpt


def _kill_mid_export(ckpt: Path, out: Path, *extra: str) -> None:
    """Start `hfmb export`, SIGKILL it once its temporary folder beside ``out`` holds a shard; assert it was killed."""
    proc = subprocess.Popen(
        [*HFMB, "export", str(ckpt), str(out), "--max-shard-size", "64KB", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
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
    result = hfmb("export", str(ckpt), str(out), "--overwrite", "--max-shard-size", "64KB")
    assert result.returncode == 0, result.stderr[-3000:]
    assert compare_hf_folders(hf, out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
