"""The preparation's process pool (pretrain/prepare/parallel.py): input order for any number of
workers, and failures that reach the caller instead of hanging the tool."""

from __future__ import annotations

import functools
import operator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest

from pretrain.prepare.parallel import ordered_map

# Factories of stdlib functions, so spawned workers import nothing heavy.
TIMES_3 = functools.partial(functools.partial, operator.mul, 3)
ONE_OVER = functools.partial(functools.partial, operator.truediv, 1)
CANNOT_START = functools.partial(int, "not a number")  # raises in every worker's initializer


def within(seconds: float, fn, *args):
    """fn(*args), or a failure after `seconds`: a pool that hangs must fail the test, not stall it."""
    with ThreadPoolExecutor(1) as runner:
        return runner.submit(fn, *args).result(timeout=seconds)


@pytest.mark.parametrize("workers", [1, 2])
def test_results_keep_input_order_with_a_bounded_queue(workers):
    assert within(60, lambda: list(ordered_map(TIMES_3, range(25), workers, pending_per_worker=1))) == [
        3 * i for i in range(25)
    ]


def test_a_task_error_reaches_the_caller():
    with pytest.raises(ZeroDivisionError):
        within(60, lambda: list(ordered_map(ONE_OVER, [4, 2, 0, 1], 2)))


def test_workers_that_cannot_start_raise_instead_of_hanging():
    with pytest.raises(BrokenProcessPool):
        within(60, lambda: list(ordered_map(CANNOT_START, range(4), 2)))
