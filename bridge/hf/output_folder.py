"""The folders a command publishes: what ``overwrite`` may replace, one run per target, publishing that replaces nothing unchecked.

- **One run per target.** A run claims its target for its whole length with an exclusive lock on a
  file beside it (``.NAME.hfmb-lock``); a second run to the same target is refused at once.
- **What ``overwrite`` may replace.** Only a folder of the kind the run writes whose every entry is
  one the project itself writes there (``FolderKind``): an HF model folder's weights, index, config,
  generation and tokenizer files; a Megatron checkpoint's tracker, iteration folders of
  dist-checkpoint files, ``hf_config/`` and ``bridge.json``. Anything else is refused, naming the
  first entry that blocks it: a stray ``notes.txt`` or ``.ssh/`` is the user's, never ours to delete.
- **Symbolic links** are followed: the target is the folder a link points to (locked, written beside
  and replaced there), so the link itself stays and shows the new content. A link to nowhere is refused.
- **Publishing** renames the finished temporary folder into place. Onto an absent target (or an
  empty one, as checked) it never replaces anything that appeared meanwhile (``RENAME_NOREPLACE``).
  With ``overwrite`` the old folder is swapped out and deleted only if it holds nothing the check
  did not see; an entry that appeared while the run wrote makes it swap back and refuse.
- **Leftovers.** Temporary folders and lock files of processes of this host that no longer run are
  removed by any later run in the same parent folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from bridge.hf.parent_folders import created_parents

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".hfmb-lock"


class OutputFolderError(ValueError):
    """The target cannot be written: a file, not empty, not ours to replace, or claimed by another run."""


# ---------------------------------------------------------------- what a folder of each kind holds


def _json_object_with(path: Path, test: Callable[[dict], bool]) -> bool:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(content, dict) and test(content)


def _is_model_config(path: Path) -> bool:
    return _json_object_with(path, lambda config: "model_type" in config or "architectures" in config)


def _is_tracker(path: Path) -> bool:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return False
    return text == "release" or text.isdigit()


def _is_source_info(path: Path) -> bool:
    return _json_object_with(path, lambda info: str(info.get("format", "")).startswith("hf-megatron-bridge/"))


@dataclass(frozen=True)
class FolderKind:
    """A kind of folder the project publishes, by the entries it writes into one.

    ``files``: top-level file names (regular expressions); ``folders``: top-level folder names →
    the file names inside them; ``contents``: a file name → a test its content must pass (a
    ``config.json`` that is not a model config is somebody else's file).
    """

    description: str
    files: tuple[str, ...]
    folders: dict[str, tuple[str, ...]] = field(default_factory=dict)
    contents: dict[str, Callable[[Path], bool]] = field(default_factory=dict)

    def foreign_entry(self, folder: Path) -> str | None:
        """The first entry of ``folder`` (relative path) that a folder of this kind would not hold; None if all would."""
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            if entry.is_symlink():
                return entry.name
            if entry.is_dir():
                inner = next((pats for name, pats in self.folders.items() if re.fullmatch(name, entry.name)), None)
                if inner is None:
                    return entry.name + "/"
                for child in sorted(entry.iterdir(), key=lambda p: p.name):
                    if child.is_symlink() or not child.is_file() or not any(re.fullmatch(p, child.name) for p in inner):
                        return f"{entry.name}/{child.name}" + ("/" if child.is_dir() else "")
                    if child.name in self.contents and not self.contents[child.name](child):
                        return f"{entry.name}/{child.name}"
            elif not entry.is_file() or not any(re.fullmatch(p, entry.name) for p in self.files):
                return entry.name
            elif entry.name in self.contents and not self.contents[entry.name](entry):
                return entry.name
        return None


_HF_SIDE_FILES = (
    r"generation_config\.json",
    r"tokenizer\.json",
    r"tokenizer_config\.json",
    r"special_tokens_map\.json",
    r"added_tokens\.json",
    r"tokenizer\.model",
    r"vocab\.json",
    r"merges\.txt",
    r"chat_template\.jinja",
    r"chat_template\.json",
)

HF_MODEL_FOLDER = FolderKind(
    "an HF model folder",
    files=(
        r"config\.json",
        r"model\.safetensors\.index\.json",
        r"model\.safetensors",
        r"model-\d{5}-of-\d{5}\.safetensors",
        *_HF_SIDE_FILES,
    ),
    contents={"config.json": _is_model_config},
)

MEGATRON_CHECKPOINT = FolderKind(
    "a Megatron checkpoint",
    files=(r"latest_checkpointed_iteration\.txt", r"\.latest_checkpointed_iteration\.txt\.tmp", r"bridge\.json"),
    folders={
        r"release|iter_\d{7}": (r"__\d+_\d+\.distcp", r"\.metadata", r"metadata\.json", r"common\.pt"),
        r"hf_config": (r"config\.json", *_HF_SIDE_FILES),
    },
    contents={"latest_checkpointed_iteration.txt": _is_tracker, "bridge.json": _is_source_info, "config.json": _is_model_config},
)


# ---------------------------------------------------------------- claiming a target


@dataclass
class OutputTarget:
    """A checked, locked target: where to write beside it, and how to move the result into place."""

    path: Path  # the real folder (symbolic links followed)
    overwrite: bool
    kind: FolderKind
    existed: bool = False
    checked: frozenset[str] = frozenset()  # entries (relative paths) the check saw

    def check(self) -> None:
        """Refuse a file, a foreign folder, or a non-empty one without ``overwrite``; record what was seen."""
        path = self.path
        self.existed = path.exists()
        if self.existed and not path.is_dir():
            raise OutputFolderError(f"{path} exists and is not a folder")
        self.checked = frozenset(_entries(path)) if self.existed else frozenset()
        if not self.checked:
            return
        if not self.overwrite:
            raise OutputFolderError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        foreign = self.kind.foreign_entry(path)
        if foreign is not None:
            raise OutputFolderError(
                f"{path} is not {self.kind.description} this tool wrote: it holds {foreign!r}, which it would delete; "
                "refusing to replace it even with overwrite (move that entry away, or remove the folder yourself)"
            )

    def temp_path(self) -> Path:
        """A fresh temporary folder name beside the target (same filesystem: the final rename is atomic)."""
        return temp_name(self.path, "tmp")

    def publish(self, tmp_dir: Path) -> None:
        """Make ``tmp_dir`` durable and rename it to the target; replaces only what ``check`` saw."""
        tmp_dir, path = Path(tmp_dir), self.path
        _fsync_tree(tmp_dir)
        if not self.checked:
            if self.existed:
                try:
                    os.rmdir(path)  # empty when checked; fails if anything arrived since
                except FileNotFoundError:
                    pass
                except OSError as err:
                    raise self._changed(f"{path} is no longer empty") from err
            if not _rename_noreplace(tmp_dir, path):
                raise self._changed(f"{path} appeared while this run wrote it")
        else:
            old = self._swap_in(tmp_dir)
            shutil.rmtree(old)
        _fsync_dir(path.parent)

    def _swap_in(self, tmp_dir: Path) -> Path:
        """Put ``tmp_dir`` in the target's place; returns where the old folder now is (swapped back if it changed)."""
        path = self.path
        if _exchange(tmp_dir, path):
            old, restore = tmp_dir, lambda: _exchange(tmp_dir, path)
        else:
            old = temp_name(path, "old")
            os.rename(path, old)
            restore = lambda: _rename_noreplace(old, path)  # noqa: E731
        arrived = sorted(set(_entries(old)) - self.checked)
        if arrived:
            restore()
            raise self._changed(f"{arrived[0]!r} appeared in {path} while this run wrote it")
        if old != tmp_dir and not _rename_noreplace(tmp_dir, path):
            _rename_noreplace(old, path)
            raise self._changed(f"{path} appeared while this run wrote it")
        return old

    def _changed(self, what: str) -> OutputFolderError:
        return OutputFolderError(f"{what}; it was left as it is and nothing was published (the result was discarded)")


@contextlib.contextmanager
def claimed_target(out_dir: str | Path, *, overwrite: bool, kind: FolderKind) -> Iterator[OutputTarget]:
    """Lock ``out_dir`` for this run, check it (see the module's docstring) and clear leftovers beside it.

    A process may claim a target it already holds (a command and the writer it calls): the lock is
    shared, and each claim checks the target anew. The folders above the target that are missing
    are created, and removed again at the end of the claim if they are left empty (a run refused
    before it published anything leaves no folder behind: ``bridge.hf.parent_folders``).
    """
    path = real_target(out_dir)
    with created_parents(path), _locked(path):
        target = OutputTarget(path, overwrite, kind)
        target.check()
        remove_stale_leftovers(path.parent)
        yield target


def real_target(out_dir: str | Path) -> Path:
    """``out_dir`` absolute, with symbolic links followed; a link to nowhere is refused."""
    out_dir = Path(out_dir).absolute()
    if out_dir.is_symlink() and not out_dir.exists():
        raise OutputFolderError(f"{out_dir} is a symbolic link to {os.readlink(out_dir)}, which does not exist")
    return out_dir.resolve()


_held_locks: dict[Path, list] = {}  # target → [fd, claims]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    if path in _held_locks:
        _held_locks[path][1] += 1
        try:
            yield
        finally:
            _held_locks[path][1] -= 1
        return
    lock_file = path.parent / f".{path.name}{LOCK_SUFFIX}"
    fd = _take_lock(lock_file)
    if fd is None:
        raise OutputFolderError(f"another run is writing {path} (it holds {lock_file}); wait for it to end, or write elsewhere")
    _held_locks[path] = [fd, 1]
    try:
        yield
    finally:
        if _held_locks[path][1] == 1:
            del _held_locks[path]
            with contextlib.suppress(OSError):
                os.unlink(lock_file)  # while holding it: a run that opened this file retries on a fresh one
            os.close(fd)
        else:
            _held_locks[path][1] -= 1


def _take_lock(lock_file: Path) -> int | None:
    """An open descriptor of ``lock_file`` holding its exclusive lock, or None when another process holds it."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.write(fd, f"{_host()} {os.getpid()}\n".encode())
            return fd
        os.close(fd)  # its holder removed it as we opened it: lock the new one


# ---------------------------------------------------------------- temporary folders and leftovers

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{8}")


def temp_name(out_dir: Path, what: str = "tmp") -> Path:
    """A fresh name beside ``out_dir`` for a temporary (``tmp``) or replaced (``old``) folder, naming this host and process."""
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}.{what}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_leftovers(parent: Path) -> list[Path]:
    """Remove from ``parent`` the temporary folders and lock files of processes of this host that no longer run."""
    removed = []
    with contextlib.suppress(OSError):
        for path in Path(parent).iterdir():
            match = _LEFTOVER.fullmatch(path.name)
            if match and match.group("host") == _host() and not _alive(int(match.group("pid"))):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                logger.warning("removed %s, left behind by an interrupted run (process %s)", path, match.group("pid"))
            elif path.name.startswith(".") and path.name.endswith(LOCK_SUFFIX) and path.is_file():
                target = path.parent / path.name[1 : -len(LOCK_SUFFIX)]
                if target not in _held_locks and (fd := _take_lock(path)) is not None:
                    os.unlink(path)
                    os.close(fd)
    return removed


# ---------------------------------------------------------------- file system primitives


def _entries(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*")]


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV)


def _renameat2(a: Path, b: Path, flags: int) -> int | None:
    """``renameat2(a, b, flags)``: 0 on success, the errno on failure, None where the platform has no renameat2."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return 0
    return ctypes.get_errno()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the platform or filesystem cannot."""
    err = _renameat2(a, b, _RENAME_EXCHANGE)
    if err is None or err in _UNSUPPORTED:
        return False
    if err:
        raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")
    return True


def _rename_noreplace(a: Path, b: Path) -> bool:
    """Rename ``a`` to ``b`` unless ``b`` exists; False when it does."""
    err = _renameat2(a, b, _RENAME_NOREPLACE)
    if err is None or err in _UNSUPPORTED:  # no renameat2 here: check, then rename (replaces at most an empty folder)
        if os.path.lexists(b):
            return False
        os.rename(a, b)
        return True
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        return False
    if err:
        raise OSError(err, f"cannot rename {a} to {b}: {os.strerror(err)}")
    return True


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
