"""How many of torch's intra-op threads a merge uses (README, "Threads").

A rank merges on one thread (``one``). torch splits a whole-tensor reduction between its
threads, and so its float bits depend on their number. The reductions are the norms and
cosines of slerp and model_stock, DARE's and DELLA's L1 rescale, sce's energies (mean τ²),
and LAPACK's and BLAS's blocking in the SVD methods. One rank alone has a thread per core,
torchrun gives each of several ranks OMP_NUM_THREADS=1, and a Slurm job has what
--cpus-per-task says. On one thread the bytes are the same everywhere.

A step whose bits cannot depend on the thread count may use every thread the rank was given
(``every``). These are DELLA's ranking of |δ| within each row (a sort along rows, each row
sorted whole by one thread) and the element-wise passes of DARE, DELLA, sce and
model_stock (the task vectors and products its reductions read, and the interpolation).
Not what runs between a chunked form's yields: a ``with every()`` around a ``yield`` stays
entered while the generator waits, and its caller's small torch ops on each chunk become
OpenMP regions that wait for a core the writer's threads hold (README, "Performance", run
20). Nor sce's selection by variance: torch ops on 256K-element chunks, where a second
thread's waits cost more CPU than it saves (the same wall time, 22-25 against 15.5-19 s of CPU).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")

_GIVEN: contextvars.ContextVar[int | None] = contextvars.ContextVar("distmerge_threads_given", default=None)
"""Inside ``one``: the intra-op thread count the process had before it (what ``every`` restores)."""


@contextlib.contextmanager
def using(n: int):
    """torch's intra-op thread count set to ``n`` inside, restored after."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def one():
    """One intra-op thread: every float reduction gets the same bits whatever the machine.
    The count it replaces (torch's own: OMP_NUM_THREADS, MKL_NUM_THREADS or the physical
    cores; torchrun sets 1 for each of several ranks) is what ``every`` uses inside."""
    token = _GIVEN.set(_GIVEN.get() or torch.get_num_threads())
    try:
        with using(1):
            yield
    finally:
        _GIVEN.reset(token)


def given() -> int:
    """How many threads the process was given: the count before ``one``; outside ``one``,
    torch's count as it is."""
    return _GIVEN.get() or torch.get_num_threads()


def every():
    """Every thread the process was given (``given``), for steps whose bits do not depend
    on the count."""
    return using(given())


def each(fn: Callable[[T], object], items: Sequence[T]) -> None:
    """``fn(item)`` for every item, on ``given()`` Python threads (one: in order, on this
    thread). For work outside torch that releases the GIL (numpy, randomgen), each item's
    result independent of the others."""
    n = min(given(), len(items))
    if n <= 1:
        for item in items:
            fn(item)
        return
    for _ in _pool(n).map(fn, items):  # raises the first error
        pass


@functools.lru_cache(maxsize=None)
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="distmerge-each")
