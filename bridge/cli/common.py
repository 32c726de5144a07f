"""What every ``hfmb`` command shares: exit codes, the report printed by rank 0, argument groups.

torch, Megatron-Core and transformers are imported where used, so that ``hfmb --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from bridge.megatron.parallel import ParallelSizes

OK, CHECK_FAILED, BAD_INPUT = 0, 1, 2
DTYPES = ("float32", "bfloat16", "float16")


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def report(text: str = "") -> None:
    """The command's report: stdout, rank 0 only."""
    if rank() == 0:
        print(text, flush=True)


def report_nonfinite(counts: dict) -> None:
    """A warning line per HF tensor holding NaN/Inf (``NonFinite`` counts): not a failure, but the forward check
    may never touch them (an embedding row no verify prompt uses)."""
    for name, count in sorted(counts.items()):
        report(f"WARNING: {name} holds {count.nan:,} NaN and {count.inf:,} Inf of {count.total:,} values")


def torch_dtype(name: str | None) -> torch.dtype | None:
    import torch

    return getattr(torch, name) if name else None


def parallel_sizes(args: argparse.Namespace) -> ParallelSizes:
    from bridge.megatron.parallel import ParallelSizes

    return ParallelSizes(tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep)


def streams(args: argparse.Namespace) -> bool:
    """Whether this import/export streams: one process (plain, or a torchrun world of one) unless --in-memory."""
    if args.command not in ("import", "export") or args.in_memory:
        return False
    return int(os.environ.get("WORLD_SIZE", "1")) == 1


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    group.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    group.add_argument("--vpp", type=int, help="virtual pipeline stages per rank (needs --pp > 1)")
    group.add_argument("--ep", type=int, default=1, help="expert-parallel size for MoE models (default 1)")
    group.add_argument("--nproc", type=int, help="ranks to start when not under torchrun (default: the smallest world the sizes need)")


def add_memory_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory")
    group.add_argument(
        "--max-memory",
        type=_size,
        help="stream tensor by tensor in one process, using at most this much memory beyond the program itself, e.g. 4GB, 500MB "
        "(default when run as one process: 60%% of the available memory, within the cgroup's limit where one is set); "
        "a budget too small for the largest tensor is refused at once, naming the least that would do",
    )
    group.add_argument(
        "--in-memory", action="store_true", help="build the whole model at --tp/--pp instead of streaming (the default under torchrun)"
    )


def iteration(text: str) -> int | str | None:
    """An ``--iteration``: a number, ``release`` (None) or ``latest`` (what the tracker file names)."""
    if text in ("latest", "release"):
        return None if text == "release" else text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an iteration number nor 'release'") from None


def _size(text: str) -> str:
    from bridge.runtime.sizes import parse_size

    try:
        parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text
