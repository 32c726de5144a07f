"""``tests/case_matrix.py``: a case that fails on some ranks fails alone, and the matrix goes on after it.

Three spawned ranks run four cases: one that works, one that raises on every rank, one where a single
rank raises while the others wait for it in a collective of a subgroup (they must get an error, not
hang), and one that works again in the world formed after the failures.
"""

from __future__ import annotations

import pytest

from bridge.runtime.local_launch import run_distributed
from tests.case_matrix import CaseFailure, case_results, run_cases

pytestmark = pytest.mark.distributed

CASES = ("works", "fails-everywhere", "fails-on-rank-1", "works-again")


def _case(case: str) -> int:
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    if case == "fails-everywhere":
        raise ValueError(f"bad input on rank {rank}")
    group = dist.new_group(list(range(dist.get_world_size())))  # a subgroup, as Megatron-Core's TP groups are
    total = torch.tensor([rank])
    if case == "fails-on-rank-1" and rank == 1:
        raise RuntimeError("rank 1 breaks before the all-reduce")
    dist.all_reduce(total, group=group)
    return int(total)


def _matrix() -> dict:
    return run_cases(CASES, _case)


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_distributed(_matrix, 3, timeout=300)


def test_cases_before_and_after_failures_pass(per_rank):
    assert case_results(per_rank, "works") == [3, 3, 3]
    assert case_results(per_rank, "works-again") == [3, 3, 3]


def test_a_case_failing_on_every_rank_records_every_rank(per_rank):
    failures = [results["fails-everywhere"] for results in per_rank]
    assert all(isinstance(f, CaseFailure) and f == failures[0] for f in failures)
    assert sorted(rank for rank, _ in failures[0].errors) == [0, 1, 2]
    assert all(f"ValueError: bad input on rank {rank}" in text for rank, text in failures[0].errors)


def test_a_case_failing_on_one_rank_names_that_rank_first(per_rank):
    failure = per_rank[0]["fails-on-rank-1"]
    assert isinstance(failure, CaseFailure) and failure.errors[0][0] == 1
    assert "RuntimeError: rank 1 breaks before the all-reduce" in failure.errors[0][1]
    with pytest.raises(pytest.fail.Exception, match=r"case 'fails-on-rank-1' failed on rank 1:(.|\n)*rank 1 breaks"):
        case_results(per_rank, "fails-on-rank-1")
