"""Failures of the filesystem (disk full, no permission), told in one line however deep a library wrapped them.

torch's checkpoint writer wraps a rank's OSError in a ``CheckpointException`` (a BaseException whose
message is a traceback), and ``torch.save``'s zip writer raises its own RuntimeError ("unexpected pos
704 vs 598") with the OSError as its context. ``cause`` finds the OSError underneath; ``describe``
names the path and what is wrong with it; ``disk_full_reported`` adds the space a write needed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

# The filesystem is out of space (or the user out of quota).
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# The filesystem refuses this process a path (counted only with the path named: EPERM has other sources too).
NOT_PERMITTED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
# How a full disk's errno reads in a message that carried it as text (Megatron's async checkpoint writer reports its worker's that way).
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]")


class DiskFullError(OSError):
    """A write ran out of space; the message names the path, the space needed (where known) and the space there was."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def size_text(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def cause(err: BaseException) -> OSError | None:
    """The first ``DISK_FULL`` OSError, or ``NOT_PERMITTED`` one naming its path, in ``err``'s chain.

    The chain is followed through causes, contexts and a CheckpointException's failures.

    An error that carries a full disk's OSError only as text (``[Errno 28] …`` in its message) gives an OSError of that errno.
    """
    todo: list[BaseException | None] = [err]
    seen: set[int] = set()
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and (current.errno in DISK_FULL or (current.errno in NOT_PERMITTED and current.filename)):
            return current
        quoted = next((int(n) for n in _ERRNO_TEXT.findall(str(current)) if int(n) in DISK_FULL), None)
        if quoted is not None:
            return OSError(quoted, os.strerror(quoted))
        todo += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)  # torch's CheckpointException: rank → (exception, traceback)
        if isinstance(failures, dict):
            todo += [failure[0] if isinstance(failure, tuple) else failure for failure in failures.values()]
    return None


def describe(err: OSError, path: str | Path | None = None) -> str:
    """One line for a ``cause``: the path it failed on (``path``, the command's output, when the error names none) and why."""
    if isinstance(err, DiskFullError):
        return str(err)
    where = err.filename or path
    if err.errno in DISK_FULL:
        return disk_full_message(where)
    return f"{where}: {os.strerror(err.errno).lower()}"


def disk_full_message(path: str | Path | None, needed: int | None = None, partial: Path | None = None) -> str:
    """``disk full writing PATH``, with the space needed (when known) and the space there was.

    That is the free space now, plus what ``partial`` (the failed write's own files, still there) takes.
    """
    facts = [f"it needs about {size_text(needed)}"] if needed else []
    free = None if path is None else _free_bytes(Path(path))
    if free is not None:
        facts.append(f"the filesystem had {size_text(free + (_bytes_under(partial) if partial else 0))} free")
    return f"disk full writing {path}" + (": " + ", ".join(facts) if facts else "")


def as_disk_full(err: BaseException, path: Path, needed: int | None = None, partial: Path | None = None) -> BaseException:
    """``err`` as a ``DiskFullError`` naming ``path`` and ``needed`` bytes when a full disk caused it (however wrapped), else ``err``.

    ``partial`` is where the failed write's own files still are (to tell the space there was).
    """
    found = cause(err)
    if found is None or found.errno not in DISK_FULL or isinstance(found, DiskFullError):
        return err
    disk_full = DiskFullError(found.errno, disk_full_message(path, needed, partial))
    disk_full.__cause__ = err
    return disk_full


@contextlib.contextmanager
def disk_full_reported(path: Path, needed: int | None = None, partial: Path | None = None) -> Iterator[None]:
    """Raise the block's error ``as_disk_full``."""
    try:
        yield
    except BaseException as err:
        reported = as_disk_full(err, path, needed, partial)
        if reported is err:
            raise
        raise reported from err


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem of ``path`` (or of its nearest existing parent)."""
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            if folder.exists():
                return shutil.disk_usage(folder).free
    return None


def _bytes_under(path: Path) -> int:
    """Bytes allocated to ``path`` (a file, or a folder's files): space that was free before this run wrote them."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
    else:
        return 0
    total = 0
    for file in files:
        with contextlib.suppress(OSError):
            total += file.stat().st_blocks * 512
    return total
