"""Run a function on N local ranks as separate processes (what torchrun would start) and collect results.

Used by the tests, the benchmarks and CPU-only conversions that want several gloo ranks without torchrun.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

# How long a rank's queued report may trail its exit, and how long the others get to stop after a failure.
REPORT_GRACE_S = 5.0


def host_rendezvous():
    """A rendezvous store hosted by this (launching) process, and the environment its ranks join it with.

    The port is the one the OS gives while binding, so concurrent launches cannot collide on it (a
    port picked free and bound later by rank 0 can be taken meanwhile). Keep the store while the ranks run.
    """
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    # torchrun's switch for "the launcher hosts the store": every rank connects as a client.
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    return store, env


def _worker(rank: int, world_size: int, store_env: dict, parent: int, fn: Callable, args: tuple, queue) -> None:
    from bridge.runtime.process_lifetime import die_with_parent

    die_with_parent(parent)  # a killed launcher must not leave ranks that go on (and publish their output)
    os.environ.update(store_env, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch

    # Share the cores between the ranks: oversubscribed intra-op threads slow every op down many times.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        from bridge.megatron.parallel import init_distributed

        init_distributed()
        # By value: a tensor put as is travels as a file descriptor this process serves, gone once it exits.
        queue.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # report every failure to the parent instead of hanging it
        queue.put((rank, False, traceback.format_exc()))
        queue.close()
        queue.join_thread()  # os._exit skips the queue's flush: without this the report could be lost and the parent wait
        os._exit(1)
    import torch.distributed as dist

    try:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
    except Exception:  # another rank failed: the launcher reports that rank, not this echo of it
        os._exit(1)


class RankFailedError(RuntimeError):
    """A local rank raised, or died without a word (killed by a signal, out of memory)."""


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 1800) -> list[Any]:
    """``fn(*args)`` on ranks 0..world_size-1 (a module-level function); returns each rank's result.

    Any failure ends the run within seconds, not at ``timeout``: a rank that raises, or one that dies
    without reporting (SIGKILL, the OOM killer), fails it with ``RankFailedError`` naming that rank,
    and the other ranks are killed. ``timeout`` only bounds ranks that are all alive and stuck (a
    loaded 2-core machine ran a four-rank test matrix for over 600 s). The rendezvous store is hosted here on a port the OS picks while
    binding it (``host_rendezvous``).
    """
    ctx = mp.get_context("spawn")
    report = ctx.Queue()
    store, store_env = host_rendezvous()
    procs = [ctx.Process(target=_worker, args=(r, world_size, store_env, os.getpid(), fn, args, report)) for r in range(world_size)]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    failed = True
    try:
        deadline = time.monotonic() + timeout
        while len(results) < world_size:
            try:
                rank, ok, value = report.get(timeout=0.5)
            except queue.Empty:
                _check_alive(procs, results, report)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size - len(results)} rank(s) did not finish within {timeout:.0f}s") from None
                continue
            if not ok:
                raise RankFailedError(f"rank {rank} failed:\n{value}{_deaths(procs, results, exclude=rank)}")
            results[rank] = pickle.loads(value)
        failed = False
    finally:
        for proc in procs:
            proc.join(timeout=REPORT_GRACE_S if failed else 30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        del store
    return [results[r] for r in range(world_size)]


def _check_alive(procs: list, results: dict[int, Any], report) -> None:
    """Raise when a rank exited without a result, once its report (if any) had time to arrive."""
    silent = [rank for rank, proc in enumerate(procs) if rank not in results and proc.exitcode is not None]
    if not silent:
        return
    with contextlib.suppress(queue.Empty):  # its report may still be in the pipe
        rank, ok, value = report.get(timeout=REPORT_GRACE_S)
        if not ok:
            raise RankFailedError(f"rank {rank} failed:\n{value}{_deaths(procs, results, exclude=rank)}")
        results[rank] = pickle.loads(value)
        return
    rank = silent[0]
    raise RankFailedError(f"rank {rank} {_exit_words(procs[rank].exitcode)} without reporting an error{_deaths(procs, results, rank)}")


def _deaths(procs: list, results: dict[int, Any], exclude: int) -> str:
    """Other ranks that died by a signal: often the cause of the failure reported (a lost peer breaks collectives)."""
    time.sleep(0.2)
    lost = [
        f"rank {r} {_exit_words(p.exitcode)}" for r, p in enumerate(procs) if r != exclude and r not in results and (p.exitcode or 0) < 0
    ]
    return "\n(also: " + "; ".join(lost) + ")" if lost else ""


def _exit_words(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with status {exitcode}"
