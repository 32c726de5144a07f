"""Run a function on N local ranks as separate processes (what torchrun would start) and collect results.

Used by the tests, the benchmarks and CPU-only conversions that want several gloo ranks without torchrun.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, parent: int, fn: Callable, args: tuple, queue) -> None:
    from bridge.runtime.process_lifetime import die_with_parent

    die_with_parent(parent)  # a killed launcher must not leave ranks that go on (and publish their output)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch

    # Share the cores between the ranks: oversubscribed intra-op threads slow every op down many times.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        from bridge.megatron.parallel import init_distributed

        init_distributed()
        queue.put((rank, True, fn(*args)))
    except BaseException:  # report every failure to the parent instead of hanging it
        queue.put((rank, False, traceback.format_exc()))
        queue.close()
        queue.join_thread()  # os._exit skips the queue's flush: without this the report could be lost and the parent wait
        os._exit(1)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 600) -> list[Any]:
    """``fn(*args)`` on ranks 0..world_size-1 (a module-level function); returns each rank's result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, os.getpid(), fn, args, queue)) for r in range(world_size)]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return [results[r] for r in range(world_size)]
