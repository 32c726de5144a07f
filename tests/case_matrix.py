"""The cases of a distributed test matrix (models × layouts) in one group of spawned ranks, each failing alone.

``run_cases`` runs inside the ranks that ``run_distributed`` starts: every rank runs each case in
turn. A case that raises on any rank becomes that case's result on every rank (``CaseFailure``, with
the failed ranks' tracebacks) and the next case starts in a new world: the failed rank frees its
process groups at once, so that a rank waiting for it in a collective gets an error instead of
hanging, and all ranks form the world again over the same store. The tests read each case through
``case_results``: the failed case's tests fail with the rank's message, the other cases' tests pass.
"""

from __future__ import annotations

import datetime
import gc
import pickle
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, TypeVar

import pytest

Case = TypeVar("Case", bound=Hashable)
# How long ranks wait for each other at the end of a case (for the slowest rank to finish it).
AGREE_TIMEOUT = datetime.timedelta(seconds=600)


@dataclass(frozen=True)
class CaseFailure:
    """A case that raised: (rank, traceback) of every rank that failed, the first to fail first."""

    case: Hashable
    errors: tuple[tuple[int, str], ...]

    def __str__(self) -> str:
        (first, text), later = self.errors[0], self.errors[1:]
        lines = [f"case {self.case!r} failed on rank {first}:", text.rstrip()]
        for rank, text in later:  # usually the collectives the first failure broke
            lines.append(f"then on rank {rank}: {text.rstrip().splitlines()[-1]}")
        return "\n".join(lines)


def run_cases(cases: Iterable[Case], run_case: Callable[[Case], Any]) -> dict[Case, Any]:
    """``run_case(case)`` for each case on every rank, in order; case → this rank's result or the ``CaseFailure``."""
    import torch.distributed as dist

    rank, world, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    store = dist.PrefixStore("case-matrix/", dist.distributed_c10d._get_default_store())  # outlives every world
    results: dict[Case, Any] = {}
    for index, case in enumerate(cases):
        result, error = None, None
        try:
            result = run_case(case)
        except Exception:
            error = (time.time(), traceback.format_exc())
        if error is not None:  # out of the except block, so that the failed frames (and their groups) are gone
            _free_process_groups()
        store.set(f"{index}/{rank}", pickle.dumps(error))
        keys = [f"{index}/{r}" for r in range(world)]
        store.wait(keys, AGREE_TIMEOUT)
        reports = [pickle.loads(value) for value in store.multi_get(keys)]  # per rank: (time, traceback) or None
        failed = sorted((report[0], r, report[1]) for r, report in enumerate(reports) if report is not None)
        if not failed:
            results[case] = result
            _free_case_groups()
            continue
        results[case] = CaseFailure(case, tuple((r, text) for _, r, text in failed))
        _free_process_groups()
        dist.init_process_group(backend, store=dist.PrefixStore(f"world-{index}/", store), rank=rank, world_size=world)
    return results


def _free_case_groups() -> None:
    """Destroy Megatron-Core's parallel state and the process groups a case made, keeping the world.

    Megatron-Core forgets its groups without destroying them; each gloo group keeps its threads
    (a 45-case matrix left ~2000 threads per rank, the machine spending most of its time in the kernel).
    A destroyed gloo group stops its threads only once the group object is freed, and the case's
    model (reference cycles: modules that hold their groups) keeps it alive until a full collection,
    which a heap this large rarely triggers: hence the ``gc.collect``.
    Every rank calls this after all ranks finished the case.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    world = dist.GroupMember.WORLD
    for group in [g for g in dist.distributed_c10d._world.pg_map if g is not world]:  # torch lists groups nowhere public
        dist.destroy_process_group(group)
    gc.collect()


def _free_process_groups() -> None:
    """Destroy Megatron-Core's parallel state and every process group of this rank (idempotent)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    gc.collect()  # groups held in reference cycles (modules of the failed model) close their connections now
    if dist.is_initialized():
        dist.destroy_process_group()


def case_results(per_rank: list[dict[Case, Any]], case: Case) -> list[Any]:
    """Each rank's result of ``case``; fails the calling test with the failed ranks' messages when the case failed."""
    results = [rank_results[case] for rank_results in per_rank]
    failure = next((result for result in results if isinstance(result, CaseFailure)), None)
    if failure is not None:
        pytest.fail(str(failure), pytrace=False)
    return results
