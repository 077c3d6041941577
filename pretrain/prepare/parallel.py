"""An ordered, memory-bounded parallel map for preparation: the output is the same for any
number of workers, so shards do not depend on the machine that wrote them."""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

DEFAULT_PENDING_PER_WORKER = 2  # tasks queued per worker: keeps workers busy, bounds memory

_worker_fn: Callable[[Any], Any] | None = None


def ordered_map(
    make_fn: Callable[[], Callable[[Any], Any]],
    items: Iterable[Any],
    workers: int,
    pending_per_worker: int = DEFAULT_PENDING_PER_WORKER,
) -> Iterator[Any]:
    """`make_fn()(item)` for each item, in input order, computed by `workers` processes.

    `make_fn` (picklable: a class or a functools.partial) builds the function once per process,
    so an expensive one (a tokenizer) is not sent with every task. Tasks are submitted a few at a
    time, so items are read only a little ahead of the workers. Workers are spawned, not forked:
    the parent may run threads (fsspec's event loop) that a fork would copy mid-lock. A worker
    that dies (or cannot start) breaks the pool, which raises here instead of waiting forever.
    """
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    if workers == 1:
        yield from map(make_fn(), items)
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(make_fn,))
    try:
        queued: deque[Future] = deque()
        for item in items:
            queued.append(pool.submit(_call_worker_fn, item))
            if len(queued) >= workers * pending_per_worker:
                yield queued.popleft().result()
        while queued:
            yield queued.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def _init_worker(make_fn: Callable[[], Callable[[Any], Any]]) -> None:
    global _worker_fn
    _worker_fn = make_fn()


def _call_worker_fn(item: Any) -> Any:
    return _worker_fn(item)
