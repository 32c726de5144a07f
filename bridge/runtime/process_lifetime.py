"""Nothing the project starts outlives the process that started it.

Two kinds of processes would otherwise: the ranks ``hfmb`` starts itself (``bridge.runtime.local_launch``),
which went on to publish a target after their launcher was killed; and the helpers Megatron-Core's
checkpoint writer starts inside a rank (a multiprocessing manager serving its results queue, with
its resource tracker, and forked writers), which stayed alive indefinitely after their rank was
killed. Each such process asks the kernel for SIGKILL when its parent dies (Linux
``PR_SET_PDEATHSIG``; elsewhere a thread watches the parent).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
import time

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """End this process when its parent does; ``parent_pid``: the parent expected (it may have died already)."""
    parent_pid = os.getppid() if parent_pid is None else parent_pid
    if not (sys.platform.startswith("linux") and _prctl_deathsig()):
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="watch-parent").start()
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _prctl_deathsig() -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


class _ForkHook:
    """What ``multiprocessing.util.register_after_fork`` keeps a weak reference to."""


_fork_hook: _ForkHook | None = None


def checkpoint_helpers_die_with_this_process() -> None:
    """Make the processes Megatron-Core's dist-checkpoint writer starts from this one die with it.

    Forked writers get the request through multiprocessing's after-fork hooks; the results queue's
    manager, which Megatron-Core starts lazily (spawned, so no hook reaches it), is started here
    first with the request as its initializer. Idempotent.
    """
    global _fork_hook
    if _fork_hook is None:
        _fork_hook = _ForkHook()
        multiprocessing.util.register_after_fork(_fork_hook, lambda _: die_with_parent())
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        from multiprocessing.managers import SyncManager

        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps its manager alive
