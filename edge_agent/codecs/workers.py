"""A small thread pool for folds over disjoint parameter blocks (numpy and BLAS release the GIL).

Aggregation is a server job, where using the machine's cores is legitimate. The pool is created
on first use (never in a constructor) and only for ``count > 1``; a job list of one runs inline.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

MAX_DEFAULT_WORKERS = 4  # more threads than this only add contention on the memory bus


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one), at most 4."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(available, MAX_DEFAULT_WORKERS))


class FoldWorkers:
    """Runs a list of independent jobs on ``count`` threads; the caller's thread runs the first."""

    def __init__(self, count: int | None = None) -> None:
        resolved = default_workers() if count is None else count
        if resolved < 1:
            raise ValueError(f"workers must be >= 1, got {count}")
        self.count = resolved
        self._pool: ThreadPoolExecutor | None = None

    def run(self, jobs: Sequence[Callable[[], T]]) -> list[T]:
        """Every job's result, in order; a job's exception is re-raised after all jobs finished."""
        if len(jobs) <= 1 or self.count == 1:
            return [job() for job in jobs]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.count - 1, thread_name_prefix="fedflock-fold")
        futures: list[Future[T]] = [self._pool.submit(job) for job in jobs[1:]]
        try:
            first = jobs[0]()
        finally:
            for future in futures:  # never leave a job running on shared buffers
                future.exception()
        return [first, *(future.result() for future in futures)]

    def close(self) -> None:
        """Stop the threads (a later :meth:`run` starts new ones)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
