"""How much memory a block of code took at its peak, beyond what the process held when it began (Linux)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    """Context manager: ``peak`` is the process's resident-memory high-water mark while the block ran, less its resident memory at entry.

    Resident memory (``VmRSS``/``VmHWM`` of ``/proc/self/status``) counts the pages of memory-mapped
    files the process touched (the HF reader's windows) as well as what it allocated: the budget
    counts both, so both are counted here. Page cache of files read or written with ``read``/``write``
    (the checkpoint's files, an export's shards) is not, which is right: it belongs to no process and
    the kernel drops it as needed.

    At entry the process's high-water mark is reset (``5`` into ``/proc/self/clear_refs``, Linux 4.0+),
    so that a peak reached before the block (while importing modules) does not count; someone
    measuring the same process from outside sees it reset too. Where it cannot be reset, ``peak``
    is the mark since the process began (an upper bound) and ``exact`` is False. Without
    ``/proc`` (not Linux), ``peak`` is None.
    """

    def __init__(self) -> None:
        self.baseline: int | None = None
        self.peak: int | None = None
        self.exact = False

    def __enter__(self) -> PeakMemory:
        self.baseline = _status_bytes("VmRSS")
        try:
            _CLEAR_REFS.write_text("5")
            self.exact = True
        except OSError as err:
            logger.debug("cannot reset the peak resident memory (%s): the peak reported includes earlier ones", err)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        high = _status_bytes("VmHWM")
        if self.baseline is not None and high is not None:
            self.peak = max(0, high - self.baseline)


def _status_bytes(field: str) -> int | None:
    """A size field of ``/proc/self/status`` (kB there) in bytes; None where there is none."""
    try:
        with _STATUS.open() as lines:
            return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":")), None)
    except OSError:
        return None
