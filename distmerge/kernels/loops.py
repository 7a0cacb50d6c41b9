"""The TIES family's passes over bfloat16 inputs as single loops on CPU, compiled by numba.

A chunked top-k merge (ties, breadcrumbs: ``methods.task_arithmetic``) goes over each large
tensor three times: two statistics passes find every model's top-k threshold
(``sparsify.ChunkedTopK``), a third trims and combines. In torch ops each pass widens the
bf16 inputs to float32 chunks, subtracts, takes the magnitudes' bits and histograms them,
every step a pass over memory with a fresh result. Here each pass is one loop that reads
the stored bf16 values once:

- ``magnitude_histograms``: pass 1, the high 16 bits of |τᵢ|'s float32 bits, τᵢ = θᵢ − θ₀;
- ``magnitude_selects``: pass 2, |τᵢ|'s bits for the entries in each model's selected high buckets;
- ``trim_combine``: pass 3, τ̂ᵢ = τᵢ where |τᵢ|'s bits pass the cuts, +0 elsewhere, then
  ``reference.task_combine``: θ₀ + λ·Σᵢ wᵢτ̂ᵢ / D, or the TIES sign election and disjoint mean;
  with every τᵢ kept whole, ``task_merge``: task arithmetic's (and TIES's at density 1) merge.

The arithmetic is ``kernels.reference``'s, operation for operation, in float32 (widening a
bf16 value is exact: its 16 bits become the high half of a float32; numba compiles without
fast-math, so nothing is reassociated or fused), and the results are its bits:
tests/kernels/test_loops.py compares them on arbitrary finite bit patterns. Not which NaN
a difference of two NaNs is (torch's is the base's here, these loops' the model's): a tensor
with a NaN or infinite |τᵢ| is left to torch ops (``trim_combine`` reports it). Measured
here, one thread, 256K-element chunks of two bf16 models: pass 1 about 1.0–1.2 ns an entry a
model, against about 2.5 for the torch ops in ties' profile (README, "Performance", run 17).

Compiled on first use and cached on disk by numba (``cache=True``: the package's
``__pycache__``, or numba's cache directory where that is not writable), so a process
pays about 0.5 s to load them (0.1 GB of LLVM). Only bf16 inputs take these loops (a chunked merge checks
``eligible``); float16 and float32 inputs, and runs with ``KernelOptions.compile="never"``,
keep the torch ops. Each function takes 1-D numpy views of the stored bits (uint16) and
releases the GIL.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import numba
import numpy
import torch

from distmerge.kernels.keep import SELECT_ALL, SELECT_NONE
from distmerge.kernels.reference import linear_divisor

_JIT = dict(nogil=True, cache=True, error_model="numpy")
_MAGNITUDE = numpy.uint32(0x7FFFFFFF)


@numba.njit(inline="always")
def _widen(stored):
    """A bf16 value's bits (uint16) as the float32 it is exactly."""
    return numpy.uint32(numpy.uint32(stored) << 16).view(numpy.float32)


@numba.njit(inline="always")
def _magnitude_bits(delta):
    """|δ|'s float32 bits as a non-negative int32 (ordered like |δ|, NaN above +Inf)."""
    return numpy.int32(numpy.float32(delta).view(numpy.uint32) & _MAGNITUDE)


@numba.njit(**_JIT)
def _histogram(base, xs, hist):
    for j in range(base.size):
        b = _widen(base[j])
        for i in range(len(xs)):  # every model in one loop: independent increments, one read of θ₀
            hist[i, _magnitude_bits(_widen(xs[i][j]) - b) >> 16] += 1


@numba.njit(**_JIT)
def _select(base, xs, buckets, out, kept):
    kept[:] = 0
    for j in range(base.size):
        b = _widen(base[j])
        for i in range(len(xs)):
            bits = _magnitude_bits(_widen(xs[i][j]) - b)
            if ((bits >> 16) == buckets[i, 0]) | ((bits >> 16) == buckets[i, 1]):
                out[i, kept[i]] = bits
                kept[i] += 1


@numba.njit(**_JIT)
def _count(base, x, bits):
    count = 0
    for j in range(base.size):
        count += _magnitude_bits(_widen(x[j]) - _widen(base[j])) == bits
    return count


_BLOCK = 2048
"""Entries of the task vectors trimmed and weighted at a time, model by model, before they are
combined: a model's loop then has scalar parameters and vectorizes (1/10 of the time of one
loop over the entries with every model inside)."""


@numba.njit(**_JIT)
def _trim_weigh(base, x, w, keep, drop, taken, out):
    """out[j] = τ̂[j]·w for the entries of one block; ``taken``: the ties kept and dropped so
    far. Returns whether some τ[j] is NaN."""
    above, tie, ties = keep
    drop_above, drop_tie, drop_ties = drop
    zero = numpy.float32(0.0)
    nan = False
    if tie < 0 and drop_tie < 0:  # plain cuts: no ties to count
        for j in range(base.size):
            delta = _widen(x[j]) - _widen(base[j])
            bits = _magnitude_bits(delta)
            nan |= delta != delta
            out[j] = (delta if (bits > above) & (bits <= drop_above) else zero) * w
        return nan
    kept_ties, dropped_ties = taken[0], taken[1]  # in locals: stores to ``out`` may alias ``taken``
    for j in range(base.size):
        delta = _widen(x[j]) - _widen(base[j])
        bits = _magnitude_bits(delta)
        nan |= delta != delta
        kept = (bits > above) | ((bits == tie) & (kept_ties < ties))
        kept_ties += bits == tie
        dropped = (bits > drop_above) | ((bits == drop_tie) & (dropped_ties < drop_ties))
        dropped_ties += bits == drop_tie
        out[j] = (delta if kept and not dropped else zero) * w
    taken[0], taken[1] = kept_ties, dropped_ties
    return nan


@numba.njit(inline="always")
def _total(weighted, n, out):
    """out[j] = Σᵢ weighted[i, j] for j < n, added in order from the first row (``reference.total``)."""
    out[:n] = weighted[0, :n]
    for i in range(1, weighted.shape[0]):
        row = weighted[i]
        for j in range(n):
            out[j] = out[j] + row[j]


@numba.njit(**_JIT)
def _combine(base, weighted, n, weight, consensus, normalize, divisor, lam, scale, summed, mixed, total_weight, out):
    """``reference.task_combine`` of the first n entries of one block's weighted task vectors
    (rows of ``weighted``): model by model over the block, so that each loop vectorizes; per
    entry, the same operations in the same order as the reference's."""
    zero, one = numpy.float32(0.0), numpy.float32(1.0)
    models = weighted.shape[0]
    if consensus:  # reference.disjoint_sum: γ = sgn Σᵢ wᵢτᵢ, then the agreeing ones
        _total(weighted, n, summed)
        mixed[:n] = zero
        total_weight[:n] = zero
        for i in range(models):
            row, w = weighted[i], weight[i]
            for j in range(n):
                v = row[j]
                positive = summed[j] >= zero  # γ = +1 (NaN elects −1)
                agree = ((v > zero) & positive) | ((v < zero) & ~positive)
                mixed[j] = mixed[j] + (v if agree else zero)
                total_weight[j] = total_weight[j] + (one if agree else zero) * w
        for j in range(n):
            if total_weight[j] == zero:
                total_weight[j] = one
    else:  # reference.total, then the linear divisor given
        _total(weighted, n, mixed)
        total_weight[:n] = divisor
    for j in range(n):
        m = mixed[j]
        if normalize:
            m = m / total_weight[j]
        if scale:
            m = m * lam
        out[j] = _widen(base[j]) + m


@numba.njit(**_JIT)
def _trim_combine(base, xs, weight, keep, drop, consensus, normalize, divisor, lam, scale, out):
    models = len(xs)
    weighted = numpy.empty((models, _BLOCK), numpy.float32)
    summed = numpy.empty(_BLOCK, numpy.float32)
    mixed = numpy.empty(_BLOCK, numpy.float32)
    total_weight = numpy.empty(_BLOCK, numpy.float32)
    taken = numpy.zeros((models, 2), numpy.int64)  # per model: ties kept, ties dropped so far
    nan = False
    for start in range(0, base.size, _BLOCK):
        end = min(base.size, start + _BLOCK)
        for i in range(models):
            keep_i = (keep[i, 0], keep[i, 1], keep[i, 2])
            drop_i = (drop[i, 0], drop[i, 1], drop[i, 2])
            nan |= _trim_weigh(base[start:end], xs[i][start:end], weight[i], keep_i, drop_i, taken[i], weighted[i])
        _combine(base[start:end], weighted, end - start, weight, consensus, normalize, divisor, lam, scale, summed, mixed, total_weight, out[start:end])
    return nan


_LOADED: set[tuple[str, int]] = set()
"""(loop, number of models) compiled or loaded from the cache by this process: every call
passes the same array and scalar types but for the number of models."""


@contextlib.contextmanager
def _first_call(loop, models: int):
    """The first call of ``loop`` for ``models`` models in this process, under an exclusive
    lock on numba's cache directory. numba's cache is an index file that a process compiling
    a new signature reads, extends and writes back; two processes doing that at once (ranks,
    or a test suite's workers, on a cold cache) can give two signatures one data file
    (``numba.core.caching.IndexDataCacheFile.save``), which a third process then loads as
    the machine code of the other signature: a crash without a traceback. Under the lock the
    second process finds the first's entry and loads it."""
    key = (loop.py_func.__name__, models)
    if key in _LOADED:
        yield
        return
    with open(os.path.join(loop._cache.cache_path, "distmerge-loops.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield
    _LOADED.add(key)


def _bits(x: torch.Tensor) -> numpy.ndarray:
    return x.reshape(-1).view(torch.int16).numpy().view(numpy.uint16)


def eligible(base: torch.Tensor | None, tensors: list[torch.Tensor]) -> bool:
    """Whether these stored chunks can take the loops: bf16 on CPU, a base and contiguous."""
    return base is not None and all(
        x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous() for x in (base, *tensors)
    )


def magnitude_histograms(base: torch.Tensor, tensors: list[torch.Tensor], hist: torch.Tensor) -> None:
    """hist[i, h] += how many entries have h = the high 16 bits of |tensors[i] − base|'s
    float32 bits (``hist``: int64, one row of 2¹⁵ counters per tensor; the chunks bf16)."""
    with _first_call(_histogram, len(tensors)):
        _histogram(_bits(base), tuple(_bits(x) for x in tensors), hist.numpy())


def magnitude_selects(base: torch.Tensor, tensors: list[torch.Tensor], buckets: list[tuple[int, int]], out: torch.Tensor) -> list[torch.Tensor]:
    """Per tensor i, |tensors[i] − base|'s float32 bits (int32) of the entries whose high 16
    bits are buckets[i][0] or buckets[i][1], in flat order: views of the rows of ``out``
    (int32, one row per tensor at least as long as the chunk)."""
    kept = numpy.zeros(len(tensors), dtype=numpy.int64)
    with _first_call(_select, len(tensors)):
        _select(_bits(base), tuple(_bits(x) for x in tensors), numpy.asarray(buckets, dtype=numpy.int32).reshape(-1, 2), out.numpy(), kept)
    return [row[:count] for row, count in zip(out, kept.tolist())]


def count_magnitude(base: torch.Tensor, x: torch.Tensor, bits: int) -> int:
    """How many entries have |x − base|'s float32 bits equal to ``bits``."""
    with _first_call(_count, 1):
        return int(_count(_bits(base), _bits(x), numpy.int32(bits)))


def trim_combine(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weight: list[float],
    keep: list[tuple[int, int, int]],
    drop: list[tuple[int, int, int]],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    out: torch.Tensor,
) -> bool:
    """``reference.task_combine(θ₀, [τ̂ᵢ], weight, ...)`` into ``out`` (float32, the chunk's
    size), τ̂ᵢ = τᵢ = θᵢ − θ₀ where |τᵢ| is in keep[i]'s selection and not in drop[i]'s,
    +0 elsewhere. A selection (c, t, n), from ``sparsify.ChunkedTopK.rule``, is the entries
    whose |τᵢ| bits exceed c, and the first n in flat order whose bits equal t.

    Returns False when some τᵢ is NaN (a NaN input, or ∞ − ∞): then ``out`` holds the right
    values but maybe not torch's NaN bits (a difference of two NaNs is torch's base's here),
    and the caller computes the chunk with torch ops instead."""
    w = torch.tensor(weight, dtype=torch.float32)
    divisor = numpy.float32(1.0 if consensus else float(linear_divisor(w)))
    with _first_call(_trim_combine, len(tensors)):
        nan = _trim_combine(
            _bits(base),
            tuple(_bits(x) for x in tensors),
            w.numpy(),
            numpy.asarray(keep, dtype=numpy.int64).reshape(-1, 3),
            numpy.asarray(drop, dtype=numpy.int64).reshape(-1, 3),
            bool(consensus),
            bool(normalize),
            divisor,
            numpy.float32(lambda_),
            lambda_ != 1,
            out.reshape(-1).numpy(),
        )
    return not nan


def task_merge(base: torch.Tensor, tensors: list[torch.Tensor], weight: list[float], *, consensus: bool, normalize: bool, lambda_: float) -> torch.Tensor | None:
    """``reference.task_merge`` without a keep rule, of bf16 tensors (``eligible``): every
    task vector kept whole, in one loop. None where some τᵢ is NaN (``trim_combine``)."""
    out = torch.empty(base.shape, dtype=torch.float32)
    n = len(tensors)
    flags = dict(consensus=consensus, normalize=normalize, lambda_=lambda_)
    return out if trim_combine(base, tensors, weight, [SELECT_ALL] * n, [SELECT_NONE] * n, **flags, out=out) else None
