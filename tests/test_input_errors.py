"""Exit status 2 and one line naming the file or setting, for every bad input ``hfmb`` meets (issue 20, items 9-11).

A broken config.json, index, ``bridge.json`` or tracker file; an index entry outside the model folder;
a folder the output cannot be written to and a full disk (simulated in the worker: a read-only folder
refuses root nothing, and filling a real disk is slow); a safetensors header too large to parse, or
too large for ``--max-memory``. One worker process runs every command in-process (``bridge.cli.main``,
as torchrun would start it); the tests read the exit codes and messages.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import shutil
import struct
import traceback
from pathlib import Path
from unittest import mock

import pytest
from safetensors.torch import load_file, save_file

from bridge.runtime.local_launch import run_distributed

pytestmark = pytest.mark.distributed  # every test starts processes or reads what spawned ranks computed

EXIT_INPUT = 2
INDEX = "model.safetensors.index.json"
DEV_FULL = Path("/dev/full")  # every write to it fails with ENOSPC

# config.json edits: name → (edit, what the message must name)
CONFIGS = {
    "invalid-json": (lambda text, config: "{not json", "is not valid JSON"),
    "empty": (lambda text, config: "", "is empty"),
    "dtype-float13": (lambda text, config: json.dumps({**config, "dtype": "float13"}), 'dtype is "float13"'),
    "heads-string": (lambda text, config: json.dumps({**config, "num_attention_heads": "4"}), 'num_attention_heads is "4"'),
    "heads-zero": (lambda text, config: json.dumps({**config, "num_attention_heads": 0}), "num_attention_heads is 0"),
    "layers-negative": (lambda text, config: json.dumps({**config, "num_hidden_layers": -1}), "num_hidden_layers is -1"),
}
# model.safetensors.index.json contents: name → (text, what the message must name)
INDEXES = {
    "no-weight-map": (json.dumps({"metadata": {}}), "has no 'weight_map'"),
    "null-file": (json.dumps({"weight_map": {"model.norm.weight": None}}), "entry for model.norm.weight is null"),
    "invalid-json": ("{oops", "is not valid JSON"),
}
# bridge.json / tracker edits of a checkpoint written by `hfmb import`: name → (file, edit, what the message must name)
CHECKPOINTS = {
    "bridge-json-invalid": ("bridge.json", lambda info: "{oops", "bridge.json is not valid JSON"),
    "params-dtype-float13": ("bridge.json", lambda info: json.dumps({**info, "params_dtype": "float13"}), 'params_dtype is "float13"'),
    "hf-dtype-float13": (
        "bridge.json",
        lambda info: json.dumps({**info, "hf_dtypes": {**info["hf_dtypes"], "model.norm.weight": "float13"}}),
        'hf_dtypes["model.norm.weight"] is "float13"',
    ),
    "tracker-not-a-number": (
        "latest_checkpointed_iteration.txt",
        lambda info: "abc",
        "says 'abc'; expected an iteration number or 'release'",
    ),
}


def _cli(*argv: str) -> tuple[int, str, str]:
    """``hfmb argv`` in this process: (exit code, stdout, stderr); an escaping exception is exit 1 with its traceback, as in a shell."""
    from bridge.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    except BaseException:  # noqa: BLE001  (what the user would see: a traceback and exit 1)
        return 1, out.getvalue(), err.getvalue() + traceback.format_exc()
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def _refusing_writes_under(folder: Path):
    """Writes into ``folder`` fail with EACCES, as in a read-only folder (which refuses root nothing, so the test runs as anyone)."""
    inside = lambda path: isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(path)).is_relative_to(folder)  # noqa: E731
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def refuse(path) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def guarded_open(file, mode="r", *args, **kwargs):
        if inside(file) and any(flag in mode for flag in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path) and not os.path.exists(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    with (
        mock.patch("builtins.open", guarded_open),
        mock.patch("io.open", guarded_open),
        mock.patch("os.open", guarded_os_open),
        mock.patch("os.mkdir", guarded_mkdir),
    ):
        yield


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _DiskWithRoomFor(io.RawIOBase):
    """A file on a disk with ``room`` bytes free: writes past them fail with ENOSPC (part of the write lands, as on a disk)."""

    def __init__(self, room: int):
        self.room, self.position = room, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if self.position + size > self.room:
            self.position = self.room
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.position += size
        return size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.position if (offset, whence) == (0, io.SEEK_CUR) else super().seek(offset, whence)


@contextlib.contextmanager
def _checkpoint_streams_into_a_full_disk(fs, path, mode):
    """torch's checkpoint writer's ``create_stream``: 64 KiB fit, then the disk is full, in the middle of a tensor's ``torch.save``."""
    with _DiskWithRoomFor(64 * 2**10) as stream:
        yield stream


def _save_common_state_into_dev_full(root: Path) -> tuple[str, str]:
    """Save a Megatron checkpoint whose ``common.pt`` (written first) is /dev/full; the error's type and message."""
    from bridge.megatron import checkpoint as mc

    folder = mc.iteration_dir(root, None)
    folder.mkdir(parents=True)
    (folder / "common.pt").symlink_to(DEV_FULL)
    try:
        mc.save_checkpoint(root, {"iteration": 0})
    except BaseException as err:  # noqa: BLE001  (the test reads it)
        return type(err).__name__, str(err)
    return "no error", ""


def session(root: str, hf: str, broken: dict[str, str]) -> dict:
    """Every command of the tests, in this one worker (a world of one)."""
    from bridge.hf import reader as hf_checkpoint

    root_path = Path(root)
    r: dict = {name: _cli("plan", folder) for name, folder in broken.items() if not name.startswith("header-")}
    ckpt = root_path / "ckpt"
    r["import"] = _cli("import", hf, str(ckpt))
    for name, (file, edit, _) in CHECKPOINTS.items():
        copy = shutil.copytree(ckpt, root_path / f"ckpt-{name}")
        (copy / file).write_text(edit(json.loads((ckpt / "bridge.json").read_text())))
        r[f"ckpt-{name}"] = _cli("export", str(copy), str(root_path / f"out-{name}"))

    read_only = root_path / "read-only"
    read_only.mkdir()
    with _refusing_writes_under(read_only):
        r["import-read-only"] = _cli("import", hf, str(read_only / "ckpt"))
        r["export-read-only"] = _cli("export", str(ckpt), str(read_only / "out"))

    with mock.patch("os.pwrite", _no_space):  # every shard byte the HF writer writes
        r["export-disk-full"] = _cli("export", str(ckpt), str(root_path / "full" / "out"))
    with mock.patch("torch.distributed.checkpoint.filesystem.FileSystem.create_stream", _checkpoint_streams_into_a_full_disk):
        r["import-disk-full"] = _cli("import", hf, str(root_path / "full" / "ckpt"))
    r["full-leftovers"] = sorted(p.name for p in (root_path / "full").iterdir()) if (root_path / "full").exists() else []

    r["common-disk-full"] = _save_common_state_into_dev_full(root_path / "common-full") if DEV_FULL.exists() else None

    opened: list[str] = []
    real_read_header = hf_checkpoint.read_header

    def recording_read_header(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_read_header(path, *args, **kwargs)

    with mock.patch.object(hf_checkpoint, "read_header", recording_read_header):
        r["header-absurd"] = _cli("plan", broken["header-absurd"])
    r["header-absurd-opened"] = opened
    r["header-over-budget"] = _cli("import", broken["header-over-budget"], str(root_path / "never"), "--max-memory", "8MB")
    r["header-within-budget"] = _cli("import", broken["header-over-budget"], str(root_path / "header-ckpt"), "--max-memory", "64MB")
    return r


def _config_copy(src: Path, dst: Path, edit) -> Path:
    folder = shutil.copytree(src, dst)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(edit(text, json.loads(text)))
    return folder


def _with_index(src: Path, dst: Path, text: str) -> Path:
    folder = shutil.copytree(src, dst)
    (folder / INDEX).write_text(text)
    return folder


def _with_many_entries(src: Path, dst: Path, count: int) -> Path:
    """``src`` plus ``extra.safetensors``: ``count`` one-element tensors.

    Its header (~75 bytes each) dwarfs its data (2 bytes each).
    """
    folder = shutil.copytree(src, dst)
    entries = [f'"__metadata__":{json.dumps({"format": "pt"})}']
    entries += [f'"extra.{i:07d}.weight":{{"dtype":"BF16","shape":[1],"data_offsets":[{2 * i},{2 * i + 2}]}}' for i in range(count)]
    header = ("{" + ",".join(entries) + "}").encode()
    header += b" " * (-len(header) % 8)
    (folder / "extra.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(2 * count))
    return folder


def _with_metadata(src: Path, dst: Path, pad: int) -> Path:
    """``src`` with ``pad`` characters of ``__metadata__`` in its weights file's header.

    The same tensors, a header of ``pad`` bytes more.
    """
    folder = shutil.copytree(src, dst)
    (weights,) = folder.glob("*.safetensors")
    save_file(load_file(weights), weights, metadata={"format": "pt", "notes": "x" * pad})
    return folder


@pytest.fixture(scope="module")
def results(tiny_checkpoints, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("input-errors")
    llama = tiny_checkpoints["llama"]
    broken = {f"config-{name}": _config_copy(llama, root / f"config-{name}", edit) for name, (edit, _) in CONFIGS.items()}
    broken.update({f"index-{name}": _with_index(llama, root / f"index-{name}", text) for name, (text, _) in INDEXES.items()})
    inside = lambda file: json.dumps({"weight_map": {"model.norm.weight": file}})  # noqa: E731
    broken["outside-absolute"] = _with_index(llama, root / "outside-absolute", inside(str(llama / "model.safetensors")))
    broken["outside-dotdot"] = _with_index(llama, root / "outside-dotdot", inside("../../hf/llama/model.safetensors"))
    broken["header-absurd"] = _with_many_entries(llama, root / "header-absurd", 20_000)
    broken["header-over-budget"] = _with_metadata(llama, root / "header-over-budget", 900_000)
    return run_distributed(session, 1, str(root), str(llama), {name: str(path) for name, path in broken.items()})[0]


def _refused(result: tuple[int, str, str], *named: str) -> str:
    """The one error line of a refused command, checked: exit 2, no traceback, and it names each of ``named``."""
    code, _, err = result
    assert code == EXIT_INPUT and "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("hfmb ")]
    for text in named:
        assert text in line, line
    return line


# ---------------------------------------------------------------- item 9: files and settings


@pytest.mark.parametrize("name", CONFIGS)
def test_a_broken_config_is_named(results, name):
    _refused(results[f"config-{name}"], f"config-{name}/config.json", CONFIGS[name][1])


@pytest.mark.parametrize("name", INDEXES)
def test_a_broken_index_is_named(results, name):
    _refused(results[f"index-{name}"], f"index-{name}/{INDEX}", INDEXES[name][1])


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_a_broken_bridge_json_or_tracker_is_named(results, name):
    assert results["import"][0] == 0, results["import"][2][-3000:]
    file, _, what = CHECKPOINTS[name]
    _refused(results[f"ckpt-{name}"], f"ckpt-{name}/{file}", what)


@pytest.mark.parametrize("command", ["import", "export"])
def test_a_read_only_output_folder_is_named(results, command):
    _refused(results[f"{command}-read-only"], "read-only/", ": permission denied")


def test_disk_full_on_export_says_so_with_the_space_needed(results):
    line = _refused(results["export-disk-full"], "disk full writing", "full/out", "it needs about", "MiB")
    assert "No space left" not in line  # said in words, not as an errno
    assert results["full-leftovers"] == []  # no partial output, no temporary folder


def test_disk_full_on_streaming_import_says_so_with_the_space_needed(results):
    # torch.save's zip writer turned the OSError into "unexpected pos 704 vs 598"
    line = _refused(results["import-disk-full"], "disk full writing", "ckpt", "it needs about")
    assert "unexpected pos" not in line


def test_disk_full_writing_megatrons_common_state_says_so(results):
    # torch.save(obj, path) writes through a C++ stream that dropped the errno ("iostream error")
    if results["common-disk-full"] is None:
        pytest.skip("no /dev/full here to write into")
    kind, message = results["common-disk-full"]
    assert kind == "DiskFullError" and message.startswith("disk full writing"), message


# ---------------------------------------------------------------- item 10: index entries stay in the folder


@pytest.mark.parametrize("name", ["outside-absolute", "outside-dotdot"])
def test_an_index_entry_outside_the_model_folder_is_refused(results, name):
    _refused(results[name], f"{name}/{INDEX}", "model.norm.weight", "points outside the model folder")


# ---------------------------------------------------------------- item 11: headers


def test_an_absurd_header_is_refused_before_it_is_parsed(results):
    line = _refused(results["header-absurd"], "extra.safetensors", "safetensors header is 1,")
    assert "bytes for 40,000 bytes of tensor data" in line
    assert "extra.safetensors" not in results["header-absurd-opened"]


def test_headers_count_against_the_memory_budget(results):
    _refused(results["header-over-budget"], "model.safetensors", "header alone is 90", "--max-memory", "raise --max-memory")
    code, _, err = results["header-within-budget"]
    assert code == 0, err[-3000:]
