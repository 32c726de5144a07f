"""Nothing is lost that the user did not ask to lose (issue 20, items 1–5).

What ``--overwrite`` may replace (only folders whose every entry the project writes), one run per
target (a lock beside it), a publish that never replaces what appeared while the run wrote,
symbolic-link targets, and processes that die with the process that started them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from bridge.hf.folder_writer import HFFolderWriter
from bridge.hf.layout import ShardLayout
from bridge.hf.output_folder import MEGATRON_CHECKPOINT, OutputFolderError, claimed_target, temp_name
from tests.commands import HFMB, ROOT, clean_env, hfmb

EXIT_INPUT = 2


def _export(source: Path, out: Path, *, overwrite: bool = False, before_finish=None) -> Path:
    """An HF export of ``source``'s tensors through ``HFFolderWriter``; ``before_finish(out)`` runs just before publishing."""
    from safetensors.torch import load_file

    config = json.loads((source / "config.json").read_text())
    tensors = [item for file in sorted(source.glob("*.safetensors")) for item in load_file(file).items()]
    with HFFolderWriter(out, ShardLayout(tensors, 50_000), overwrite=overwrite) as folder:
        for name, tensor in tensors:
            folder.add(name, tensor)
        if before_finish is not None:
            before_finish(out)
        return folder.finish(config)


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (including hidden ones) → its bytes (None for folders)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def _home_like(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text('{"editor": "vim"}')
    (folder / ".bashrc").write_text("alias ll='ls -l'\n")
    (folder / ".ssh").mkdir()
    (folder / ".ssh" / "id_ed25519").write_text("secret")
    (folder / "projects").mkdir()
    (folder / "projects" / "train.py").write_text("print('mine')\n")
    return folder


# ---------------------------------------------------------------- 1. what --overwrite may replace


def test_overwrite_refuses_a_home_like_folder_whose_config_is_not_a_model(tiny_checkpoints, tmp_path):
    home = _home_like(tmp_path / "home")
    before = _tree(home)
    with pytest.raises(OutputFolderError, match=r"holds '\.bashrc'"):
        _export(tiny_checkpoints["llama"], home, overwrite=True)
    assert _tree(home) == before
    (home / ".bashrc").unlink()
    shutil.rmtree(home / ".ssh")
    shutil.rmtree(home / "projects")
    with pytest.raises(OutputFolderError, match="holds 'config.json'"):  # {"editor": "vim"} is not a model config
        _export(tiny_checkpoints["llama"], home, overwrite=True)
    assert json.loads((home / "config.json").read_text()) == {"editor": "vim"}


@pytest.mark.parametrize("stray", ["lora_adapter.safetensors", "README.md", "pytorch_model.bin", "runs/"])
def test_overwrite_refuses_a_model_folder_with_a_stray_entry(tiny_checkpoints, tmp_path, stray):
    out = _export(tiny_checkpoints["llama"], tmp_path / "out")
    if stray.endswith("/"):
        (out / stray).mkdir()
        (out / stray / "events").write_text("log")
    else:
        (out / stray).write_bytes(b"the user's")
    before = _tree(out)
    with pytest.raises(OutputFolderError, match=f"holds '{stray}'"):
        _export(tiny_checkpoints["qwen3"], out, overwrite=True)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder, no lock file left


def test_overwrite_replaces_an_earlier_export(tiny_checkpoints, tmp_path):
    out = _export(tiny_checkpoints["llama"], tmp_path / "out")
    _export(tiny_checkpoints["qwen3"], out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    "entries",
    [
        {"bridge.json": '{"format": "hf-megatron-bridge/1"}', ".bashrc": "x"},
        {"latest_checkpointed_iteration.txt": "release", "notes/todo.txt": "x"},
        {"latest_checkpointed_iteration.txt": "release", "release/metadata.json": "{}", "release/my_data.npy": "x"},
        {"latest_checkpointed_iteration.txt": "my words"},
        {"bridge.json": '{"editor": "vim"}'},
    ],
    ids=["bridge-json-and-dotfile", "tracker-and-folder", "foreign-file-in-iteration", "tracker-not-a-tracker", "bridge-json-not-ours"],
)
def test_checkpoint_overwrite_refuses_anything_but_the_megatron_layout(tmp_path, entries):
    out = tmp_path / "ckpt"
    for name, text in entries.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    with pytest.raises(OutputFolderError, match="is not a Megatron checkpoint this tool wrote"):
        with claimed_target(out, overwrite=True, kind=MEGATRON_CHECKPOINT):
            pass


def test_checkpoint_layout_is_replaceable(tmp_path):
    out = tmp_path / "ckpt"
    layout = {
        "latest_checkpointed_iteration.txt": "20",
        "bridge.json": '{"format": "hf-megatron-bridge/1"}',
        "hf_config/config.json": '{"model_type": "llama"}',
        "hf_config/tokenizer.json": "{}",
        "release/__0_0.distcp": "x",
        "release/.metadata": "x",
        "iter_0000020/metadata.json": "{}",
        "iter_0000020/common.pt": "x",
    }
    for name, text in layout.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    with claimed_target(out, overwrite=True, kind=MEGATRON_CHECKPOINT) as target:
        tmp = target.temp_path()
        tmp.mkdir()
        (tmp / "latest_checkpointed_iteration.txt").write_text("release")
        target.publish(tmp)
    assert sorted(p.name for p in out.iterdir()) == ["latest_checkpointed_iteration.txt"]


# ---------------------------------------------------------------- 2. the publish race


def test_a_file_created_in_the_target_during_an_overwrite_is_kept(tiny_checkpoints, tmp_path):
    out = _export(tiny_checkpoints["llama"], tmp_path / "out")

    def user_saves_a_file(target: Path) -> None:
        (target / "notes.txt").write_text("written while the export ran")

    with pytest.raises(OutputFolderError, match="'notes.txt' appeared"):
        _export(tiny_checkpoints["qwen3"], out, overwrite=True, before_finish=user_saves_a_file)
    assert (out / "notes.txt").read_text() == "written while the export ran"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("existed_empty", [False, True], ids=["absent", "empty"])
def test_a_target_filled_during_an_export_is_not_replaced(tiny_checkpoints, tmp_path, existed_empty):
    out = tmp_path / "out"
    if existed_empty:
        out.mkdir()

    def someone_writes_there(target: Path) -> None:
        target.mkdir(exist_ok=True)
        (target / "theirs.txt").write_text("theirs")

    with pytest.raises(OutputFolderError, match="nothing was published"):
        _export(tiny_checkpoints["llama"], out, before_finish=someone_writes_there)
    assert _tree(out) == {"theirs.txt": b"theirs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _hold_claim(out: Path) -> subprocess.Popen:
    """Another process claiming ``out`` (as a running export does) until it is killed."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from bridge.hf.output_folder import HF_MODEL_FOLDER, claimed_target
        with claimed_target({str(out)!r}, overwrite=True, kind=HF_MODEL_FOLDER):
            print("claimed", flush=True)
            time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "claimed"
    return proc


@pytest.mark.distributed
def test_a_second_run_to_the_same_target_is_refused_at_once(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    holder = _hold_claim(out)
    try:
        start = time.monotonic()
        with pytest.raises(OutputFolderError, match="another run is writing"):
            _export(tiny_checkpoints["llama"], out)
        assert time.monotonic() - start < 5
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    _export(tiny_checkpoints["llama"], out)  # the killed run's lock is gone with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and its lock file was cleaned up


# ---------------------------------------------------------------- 3. symbolic links


def test_overwrite_through_a_symbolic_link_replaces_the_folder_it_points_to(tiny_checkpoints, tmp_path):
    real = _export(tiny_checkpoints["llama"], tmp_path / "disk" / "real")
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "out"
    link.symlink_to(real)
    _export(tiny_checkpoints["qwen3"], link, overwrite=True)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert json.loads((link / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    assert sorted(p.name for p in (tmp_path / "links").iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["real"]


def test_a_link_to_nowhere_is_refused(tiny_checkpoints, tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "missing")
    with pytest.raises(OutputFolderError, match="symbolic link to .*missing, which does not exist"):
        _export(tiny_checkpoints["llama"], link)
    assert link.is_symlink() and not (tmp_path / "missing").exists()


def test_a_refused_run_removes_the_parent_folders_it_created(tmp_path):
    out = tmp_path / "x" / "y" / "out"
    with pytest.raises(RuntimeError, match="refused after the claim"):
        with claimed_target(out, overwrite=False, kind=MEGATRON_CHECKPOINT):
            assert out.parent.is_dir()  # the lock file lives there while the run holds the target
            raise RuntimeError("refused after the claim")
    assert sorted(tmp_path.iterdir()) == []


def test_a_refused_run_keeps_parent_folders_that_existed_or_hold_something(tmp_path):
    (tmp_path / "x").mkdir()
    out = tmp_path / "x" / "y" / "z" / "out"
    with pytest.raises(RuntimeError):
        with claimed_target(out, overwrite=False, kind=MEGATRON_CHECKPOINT):
            (tmp_path / "x" / "y" / "notes.txt").write_text("somebody else's")  # arrives while the run holds the target
            raise RuntimeError("refused")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["x", "x/y", "x/y/notes.txt"]


def test_a_published_target_keeps_the_parent_folders_created_for_it(tiny_checkpoints, tmp_path):
    out = _export(tiny_checkpoints["llama"], tmp_path / "x" / "y" / "out")
    assert (out / "config.json").is_file() and sorted(p.name for p in (tmp_path / "x" / "y").iterdir()) == ["out"]


# ---------------------------------------------------------------- CLI: import / export targets


@pytest.fixture(scope="module")
def imported(tiny_checkpoints, tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("imported") / "ckpt"
    result = hfmb("import", str(tiny_checkpoints["llama"]), str(ckpt))
    assert result.returncode == 0, result.stderr[-3000:]
    return ckpt


@pytest.mark.distributed
def test_cli_export_and_import_refuse_a_home_like_target_with_overwrite(tiny_checkpoints, imported, tmp_path):
    home = _home_like(tmp_path / "home")
    (home / "latest_checkpointed_iteration.txt").write_text("release")
    before = _tree(home)
    exported = hfmb("export", str(imported), str(home), "--overwrite")
    assert exported.returncode == EXIT_INPUT and "holds '.bashrc'" in exported.stderr, exported.stderr[-2000:]
    imported_again = hfmb("import", str(tiny_checkpoints["llama"]), str(home), "--overwrite")
    assert imported_again.returncode == EXIT_INPUT and "holds '.bashrc'" in imported_again.stderr, imported_again.stderr[-2000:]
    assert _tree(home) == before


@pytest.mark.distributed
@pytest.mark.parametrize("refusal", [["--max-memory", "1MB"], ["--overwrite", "--tp", "3"]], ids=["budget", "tp3"])
def test_cli_import_refused_after_claiming_leaves_no_parent_folder(tiny_checkpoints, tmp_path, refusal):
    result = hfmb("import", str(tiny_checkpoints["llama"]), str(tmp_path / "x" / "y" / "out"), *refusal)
    assert result.returncode == EXIT_INPUT, result.stderr[-2000:]
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.distributed
def test_cli_import_overwrites_its_own_checkpoint(tiny_checkpoints, imported, tmp_path):
    ckpt = tmp_path / "ckpt"
    first = hfmb("import", str(tiny_checkpoints["qwen3"]), str(ckpt))
    assert first.returncode == 0, first.stderr[-2000:]
    second = hfmb("import", str(tiny_checkpoints["llama"]), str(ckpt), "--overwrite")
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads((ckpt / "bridge.json").read_text())["architecture"] == "LlamaForCausalLM"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.distributed
def test_cli_export_into_the_checkpoint_through_a_link_is_refused(imported, tmp_path):
    link = tmp_path / "out"
    link.symlink_to(imported)
    before = _tree(imported)
    result = hfmb("export", str(imported), str(link), "--overwrite")
    assert result.returncode == EXIT_INPUT and "overlaps the checkpoint" in result.stderr, result.stderr[-2000:]
    assert _tree(imported) == before


# ---------------------------------------------------------------- 4. a killed launcher, leftovers


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _all_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes of ``procs`` still alive after ``timeout`` seconds (zombies count as gone)."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.distributed
def test_ranks_die_with_a_killed_launcher_and_publish_nothing(tiny_checkpoints, tmp_path):
    out = tmp_path / "ckpt"
    launcher = subprocess.Popen(
        [*HFMB, "import", str(tiny_checkpoints["llama"]), str(out), "--tp", "2", "--in-memory"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
        cwd=ROOT,
    )
    try:
        deadline = time.time() + 120
        ranks: list[psutil.Process] = []
        while time.time() < deadline and launcher.poll() is None:
            ranks = [p for p in _descendants(launcher.pid) if "spawn_main" in " ".join(p.cmdline())]
            if len(ranks) == 2:
                break
            time.sleep(0.05)
        assert len(ranks) == 2, "the launcher did not start its two ranks"
        time.sleep(2)  # the ranks are importing and setting up
        helpers = _descendants(launcher.pid)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        assert _all_gone(helpers, timeout=15) == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
    time.sleep(1)
    assert not out.exists()


@pytest.mark.distributed
def test_leftovers_of_any_dead_run_in_the_parent_folder_are_removed(tiny_checkpoints, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other = tmp_path / "another-target"
    stale = Path(str(temp_name(other)).replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    stale.mkdir()
    (stale / "shard-0.tmp").write_bytes(b"partial")
    _export(tiny_checkpoints["llama"], tmp_path / "out")
    assert not stale.exists()


# ---------------------------------------------------------------- 5. Megatron-Core's checkpoint helpers

_SAVE_AND_WAIT = """
import os, sys, time
import torch
from megatron.core.dist_checkpointing import ShardedTensor
from bridge.runtime import cpu_mode
from bridge.megatron import checkpoint as mc
from bridge.megatron.parallel import init_distributed
init_distributed()
if not cpu_mode.cuda_available():
    cpu_mode.enable_cpu_mode()
state = {"weight": ShardedTensor.from_rank_offsets("weight", torch.arange(64.0), replica_id=0)}
mc.save_checkpoint(sys.argv[1], state)
print("saved", flush=True)
time.sleep(600)
"""


@pytest.mark.distributed
def test_checkpoint_writer_helpers_die_with_their_rank(tmp_path):
    rank = subprocess.Popen(
        [sys.executable, "-c", _SAVE_AND_WAIT, str(tmp_path / "ckpt")], stdout=subprocess.PIPE, text=True, env=clean_env(), cwd=ROOT
    )
    try:
        assert rank.stdout.readline().strip() == "saved"
        helpers = _descendants(rank.pid)
        assert helpers, "Megatron-Core's writer started no helper process (the test no longer tests anything)"
        rank.send_signal(signal.SIGKILL)
        rank.wait()
        assert _all_gone(helpers, timeout=15) == []
    finally:
        if rank.poll() is None:
            rank.kill()
