"""Independent jobs of one task, run in worker processes, results handed back in submission order.

A task whose units do not depend on each other (ngram-rules: one (order, seed) per job) can spread
them over the machine's cores, each job in its own single-threaded process; tiny models gain
nothing from a second intra-op thread, so this is the way to use two cores. Workers are *spawned*
(fresh interpreters: a forked child would inherit the parent's OpenMP thread pool, which libgomp
does not survive) and kept for the rest of the process, so later models reuse them. Every job must
be picklable and deterministic from its arguments alone; then the rows do not depend on `workers`.
"""

from __future__ import annotations

import atexit
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

R = TypeVar("R")

_POOLS: dict[int, ProcessPoolExecutor] = {}


def map_jobs(fn: Callable[..., R], jobs: list[tuple[Any, ...]], workers: int = 1) -> Iterator[R]:
    """`fn(*job)` for every job, in order. With workers <= 1 each runs in this process when its
    result is asked for; otherwise all are queued at once on `workers` processes."""
    if workers <= 1:
        for job in jobs:
            yield fn(*job)
        return
    pool = _pool(workers)
    futures: list[Future] = [pool.submit(fn, *job) for job in jobs]
    try:
        for future in futures:
            yield future.result()
    except BrokenProcessPool:
        _POOLS.pop(workers, None)  # a worker died (killed, out of memory): the next call starts afresh
        raise
    finally:
        for future in futures:
            future.cancel()  # the consumer stopped early (an error, Ctrl-C): drop what has not started


def _pool(workers: int) -> ProcessPoolExecutor:
    if workers not in _POOLS:
        _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return _POOLS[workers]


@atexit.register
def _shutdown() -> None:
    for pool in _POOLS.values():
        pool.shutdown(wait=False, cancel_futures=True)
    _POOLS.clear()
