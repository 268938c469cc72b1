"""training.shared.parallel: results in input order whatever the number of processes, and
one process for small jobs."""

from __future__ import annotations

import os

import pytest

from training.shared.parallel import PARALLEL_FROM_ITEMS, default_workers, ordered_map


def _square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def test_results_come_back_in_input_order_from_other_processes() -> None:
    out = list(ordered_map(_square_and_pid, list(range(20)), workers=2))
    assert [value for value, _ in out] == [x * x for x in range(20)]
    assert os.getpid() not in {pid for _, pid in out}, "the work did not leave this process"


def test_one_worker_stays_in_this_process() -> None:
    out = list(ordered_map(_square_and_pid, [1, 2, 3], workers=1))
    assert out == [(1, os.getpid()), (4, os.getpid()), (9, os.getpid())]


def _fails_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


def test_an_exception_in_a_worker_reaches_the_caller() -> None:
    with pytest.raises(ValueError, match="three"):
        list(ordered_map(_fails_on_three, list(range(8)), workers=2))


def test_large_sets_use_the_cpus_small_ones_stay_in_process() -> None:
    assert default_workers(PARALLEL_FROM_ITEMS - 1) == 1
    assert default_workers(959) == min(8, len(os.sched_getaffinity(0)))
