"""The merge methods' passes over bfloat16 inputs as single loops on CPU, compiled by numba.

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

The random drops (dare_ties, della, …: ``task_arithmetic._dropped_chunked``) go over it once
per model to draw its keep mask and add up the L1 rescale's norms, then once to combine:

- ``bernoulli_keep``: DARE's mask, ``rng``'s Philox4x32-10 draws (vectorized: 0.45 ns a
  draw here, randomgen's C 5.5);
- ``magprune``: DELLA's mask, |τᵢ| ranked within each row by a radix sort of its bits (about
  8 ns an entry, against 30-45 for torch's stable sort), the keep probabilities and draws,
  with |τᵢ| and |τᵢ ⊙ mᵢ| for the norms; ``masked_magnitudes``: those two for DARE's masks;
- ``masked_combine``: τ̂ᵢ = (τᵢ ⊙ mᵢ)·fᵢ, then ``reference.task_combine`` as above;
- ``cascade``: ``reductions.Sum``'s additions (the norms, with torch's bits), 0.25 ns an
  element against 1.6 in torch's strided sums and numpy; ``squares``: ``reductions.Norm``'s
  (model_stock's ‖τ‖), 0.16 ns an element.

sce (``methods.sce``) goes over it three times: ``variances`` (Welford's float64 update, 1.6
ns an entry of two models against 3.5 for its torch ops), ``masked_squares`` (the energies'
terms) and ``erase_merge`` (the sign-erased weighted mean, 2.2 ns against ~8).

linear (``linear_into``): Σᵢ wᵢθᵢ (/ Σᵢ wᵢ) with ``addcmul_``'s one rounding per model (an
explicit fused multiply-add, ``_fma``), rounded to bf16 straight into the output tensor
(``Method.into``): 0.3 ns an entry of three models in cache, against 6.8 for the torch ops
(widening copies, ``addcmul_``, ``div_``) and the copy into bf16, measured on 256K-element
chunks.

model_stock (``methods.model_stock``, one ratio per tensor): ``stock_pass`` (τⱼ, and the
products τᵢ ⊙ τⱼ its dot products sum) and ``stock_interpolate`` (t·θ̄ + (1 − t)·θ₀).

A loop over a block reads the block through views sliced before it (``x[start:end]``, then
``x[j]``): indexed as ``x[start + j]`` inside, the same loops did not vectorize (4.9 against
1.9 ns an entry, measured).

The arithmetic is ``kernels.reference``'s, operation for operation, in float32 (widening a
bf16 value is exact: its 16 bits become the high half of a float32; numba compiles without
fast-math, so nothing is reassociated or fused but the one ``_fma`` asked for), and the results are its bits:
tests/kernels/test_loops.py and test_drop_loops.py compare them on arbitrary finite bit
patterns. Not which NaN a difference of two NaNs is (torch's is the base's here, these
loops' the model's): a tensor with a NaN or infinite |τᵢ| is left to torch ops (the TIES
family's statistics show it; the other loops report a NaN τᵢ, and the chunk goes to torch).
Measured here, one thread, 256K-element chunks of two bf16 models: pass 1 about 1.0–1.2 ns
an entry a model, against about 2.5 for the torch ops in ties' profile (README,
"Performance", run 17).

Compiled on first use and cached on disk by numba (``cache=True``: the package's
``__pycache__``, or numba's cache directory where that is not writable), so a process
pays about 0.5 s to load them (0.1 GB of LLVM). Only bf16 inputs take the loops that read
them (a chunked merge checks ``eligible``); float16 and float32 inputs, and runs with
``KernelOptions.compile="never"``, keep the torch ops. DARE's draws read no input (any dtype
takes them, unless "never"), and ``reductions.Sum`` runs its cascade here whenever numba
imports (the same bits as its numpy form). Each function takes 1-D numpy views of the
stored bits (uint16) and releases the GIL.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import llvmlite.ir
import numba
import numpy
import torch
from numba.core import types
from numba.extending import intrinsic, overload

from distmerge import rng, threads
from distmerge.kernels.keep import SELECT_ALL, SELECT_NONE
from distmerge.kernels.reference import linear_divisor

_JIT = dict(nogil=True, cache=True, error_model="numpy")
_MAGNITUDE = numpy.uint32(0x7FFFFFFF)


@numba.njit(inline="always")
def _widen(stored):
    """A bf16 value's bits (uint16) as the float32 it is exactly."""
    return numpy.uint32(numpy.uint32(stored) << 16).view(numpy.float32)


@numba.njit(inline="always")
def _narrow(value):
    """A float32's bf16 bits (uint16), rounded to nearest even as torch rounds it (not for NaN)."""
    u = numpy.float32(value).view(numpy.uint32)
    return numpy.uint16((u + numpy.uint32(0x7FFF) + ((u >> numpy.uint32(16)) & numpy.uint32(1))) >> numpy.uint32(16))


def _round_into(values, n, out):
    """out[:n] = values[:n] (float32): as they are into float32, rounded (``_narrow``) into
    bf16's bits (uint16). Returns whether a value rounded into bf16 is NaN or infinite,
    before or after its rounding (always False into float32: those callers check their τ)."""


_EXPONENT, _EXPONENT_BF16 = numpy.uint32(0x7F800000), numpy.uint16(0x7F80)


@overload(_round_into, inline="always")
def _round_into_typed(values, n, out):
    if out.dtype == types.uint16:

        def into_bf16(values, n, out):
            for j in range(n):
                out[j] = _narrow(values[j])
            nonfinite = numpy.uint32(0)  # a loop of its own: in the one above, it kept both from vectorizing (2.0 against 0.4 ns)
            for j in range(n):
                before = (numpy.float32(values[j]).view(numpy.uint32) & _EXPONENT) == _EXPONENT
                nonfinite |= numpy.uint32(before) | numpy.uint32((out[j] & _EXPONENT_BF16) == _EXPONENT_BF16)
            return nonfinite != 0

        return into_bf16

    def as_they_are(values, n, out):
        out[:n] = values[:n]
        return False

    return as_they_are


@intrinsic
def _fma(typingctx, a, b, c):
    """a·b + c rounded once (LLVM's ``llvm.fma``: the CPU's FMA instruction, vectorized), for
    float32 a, b, c: what torch's ``addcmul_`` computes on CPU."""
    signature = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        f32 = llvmlite.ir.FloatType()
        fma = builder.module.declare_intrinsic("llvm.fma", [f32], llvmlite.ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fma, args)

    return signature, codegen


@numba.njit(inline="always")
def _magnitude_bits(delta):
    """|δ|'s float32 bits as a non-negative int32 (ordered like |δ|, NaN above +Inf)."""
    return numpy.int32(numpy.float32(delta).view(numpy.uint32) & _MAGNITUDE)


_BLOCK = 2048
"""Entries of the task vectors trimmed and weighted (or, in pass 2, tested against the
buckets) at a time, model by model, before they are combined (or copied out): a model's loop
then has scalar parameters and vectorizes (1/10 of the time of one loop over the entries with
every model inside)."""


@numba.njit(**_JIT)
def _histogram(base, xs, hist):
    for j in range(base.size):
        b = _widen(base[j])
        for i in range(len(xs)):  # every model in one loop: independent increments, one read of θ₀
            hist[i, _magnitude_bits(_widen(xs[i][j]) - b) >> 16] += 1


@numba.njit(**_JIT)
def _select(base, xs, buckets, out, kept):
    """Per model, block by block: every entry's |τ| bits and whether they are in one of its two
    buckets (a loop that vectorizes), then the few that are, copied out in order, found eight
    flags at a time. 0.57 ns a position of two models against 1.6 for one loop testing entry
    by entry (a 256K chunk in cache); on the benchmark's second data set, ties' pass 2 took
    1.5–1.8 s against 2.5–3.6 s (alternating runs)."""
    kept[:] = 0
    bits = numpy.empty(_BLOCK, numpy.int32)
    hit = numpy.zeros(_BLOCK, numpy.uint8)
    words = hit.view(numpy.uint64)
    for start in range(0, base.size, _BLOCK):
        end = min(base.size, start + _BLOCK)
        n = end - start
        b = base[start:end]
        for i in range(len(xs)):
            x = xs[i][start:end]
            first, second = buckets[i, 0], buckets[i, 1]
            for j in range(n):
                value = _magnitude_bits(_widen(x[j]) - _widen(b[j]))
                bits[j] = value
                hit[j] = numpy.uint8(((value >> 16) == first) | ((value >> 16) == second))
            k = kept[i]
            for w in range((n + 7) >> 3):
                if words[w]:
                    for j in range(w << 3, min(n, (w << 3) + 8)):
                        if hit[j]:
                            out[i, k] = bits[j]
                            k += 1
            kept[i] = k


@numba.njit(**_JIT)
def _count(base, x, bits):
    count = 0
    for j in range(base.size):
        count += _magnitude_bits(_widen(x[j]) - _widen(base[j])) == bits
    return count


@numba.njit(**_JIT)
def _trim_weigh(base, x, w, keep, drop, taken, out):
    """out[j] = τ̂[j]·w for the entries of one block; ``taken``: the ties kept and dropped so
    far. Returns whether some τ[j] is NaN."""
    above, tie, ties = keep
    drop_above, drop_tie, drop_ties = drop
    zero = numpy.float32(0.0)
    nan = False
    if tie < 0 and drop_tie < 0:  # plain cuts: no ties to count
        above32, drop_above32 = numpy.int32(above), numpy.int32(drop_above)  # compared as int32: 8 lanes
        for j in range(base.size):
            delta = _widen(x[j]) - _widen(base[j])
            bits = _magnitude_bits(delta)
            nan |= delta != delta
            out[j] = (delta if (bits > above32) & (bits <= drop_above32) else zero) * w
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
def _agrees(v, total):
    """Whether v's sign is the one elected by ``total`` (γ = +1 where total ≥ 0; NaN elects −1),
    as ``reference.agrees``: +0, −0 and NaN agree with neither."""
    zero = numpy.float32(0.0)
    positive = total >= zero
    return ((v > zero) & positive) | ((v < zero) & ~positive)


@numba.njit(inline="always")
def _total(weighted, n, out):
    """out[j] = Σᵢ weighted[i, j] for j < n, added in order from the first row (``reference.total``)."""
    if weighted.shape[0] == 1:
        out[:n] = weighted[0, :n]
        return
    first, second = weighted[0], weighted[1]
    for j in range(n):  # the first two rows in one sweep: the same additions
        out[j] = first[j] + second[j]
    for i in range(2, weighted.shape[0]):
        row = weighted[i]
        for j in range(n):
            out[j] = out[j] + row[j]


@numba.njit(**_JIT)
def _combine(base, weighted, n, weight, consensus, normalize, divisor, lam, scale, summed, mixed, total_weight, out):
    """``reference.task_combine`` of the first n entries of one block's weighted task vectors
    (rows of ``weighted``): model by model over the block, so that each loop vectorizes; per
    entry, the same operations in the same order as the reference's. Returns whether a result
    rounded into bf16 (``_round_into``) is NaN or infinite. Seven sweeps of the block for two
    models where there were ten (no +0s stored before the sums, the zero divisors replaced
    where they divide): 1.70–1.78 against 1.94–2.05 ns a position of ``trim_combine`` in
    cache, and ties' pass 3 3.0–3.9 against 3.4–4.4 s in the run (alternating)."""
    zero, one = numpy.float32(0.0), numpy.float32(1.0)
    models = weighted.shape[0]
    if consensus:  # reference.disjoint_sum: γ = sgn Σᵢ wᵢτᵢ, then the agreeing ones
        _total(weighted, n, summed)
        row, w = weighted[0], weight[0]
        for j in range(n):  # the first model's terms added to the sums' +0 here, not to +0s stored first
            v = row[j]
            agree = _agrees(v, summed[j])
            mixed[j] = zero + (v if agree else zero)
            total_weight[j] = zero + (one if agree else zero) * w
        for i in range(1, models):
            row, w = weighted[i], weight[i]
            for j in range(n):
                v = row[j]
                agree = _agrees(v, summed[j])
                mixed[j] = mixed[j] + (v if agree else zero)
                total_weight[j] = total_weight[j] + (one if agree else zero) * w
    else:  # reference.total, then the linear divisor given
        _total(weighted, n, mixed)
    for j in range(n):
        m = mixed[j]
        if normalize:
            if consensus:
                d = total_weight[j]
                m = m / (one if d == zero else d)  # no model agrees: divided by 1
            else:
                m = m / divisor
        if scale:
            m = m * lam
        mixed[j] = _widen(base[j]) + m
    return _round_into(mixed, n, out)


@numba.njit(**_JIT)
def _trim_combine(base, xs, keep, drop, weight, consensus, normalize, divisor, lam, scale, out):
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
        nan |= _combine(base[start:end], weighted, end - start, weight, consensus, normalize, divisor, lam, scale, summed, mixed, total_weight, out[start:end])
    return nan


@numba.njit(**_JIT)
def _task_sum(base, xs, weight, normalize, divisor, lam, scale, out):
    """``_trim_combine`` with every τᵢ kept and no consensus (task arithmetic): the weighted
    τᵢ added into one block as they are computed, in the reference's order, instead of a
    block per model added up afterwards. task_arithmetic on the benchmark's second data set,
    one rank, alternating: 5.3–5.6 s (one 6.6) against 5.8–6.2 s, the same bytes."""
    acc = numpy.empty(_BLOCK, numpy.float32)
    nan = False
    for start in range(0, base.size, _BLOCK):
        end = min(base.size, start + _BLOCK)
        n, b = end - start, base[start:end]
        x, w = xs[0][start:end], weight[0]
        for j in range(n):
            delta = _widen(x[j]) - _widen(b[j])
            nan |= delta != delta
            acc[j] = delta * w
        for i in range(1, len(xs)):
            x, w = xs[i][start:end], weight[i]
            for j in range(n):
                delta = _widen(x[j]) - _widen(b[j])
                nan |= delta != delta
                acc[j] = acc[j] + delta * w
        for j in range(n):
            m = acc[j]
            if normalize:
                m = m / divisor
            if scale:
                m = m * lam
            acc[j] = _widen(b[j]) + m
        nan |= _round_into(acc, n, out[start:end])
    return nan


# ---------------------------------------------------------------- random drops (DARE, DELLA)

_WORD, _HALF = numpy.uint64(0xFFFFFFFF), numpy.uint64(0x80000000)
_ROUND_A, _ROUND_B = numpy.uint64(0xD2511F53), numpy.uint64(0xCD9E8D57)
_KEY_A, _KEY_B = numpy.uint64(0x9E3779B9), numpy.uint64(0xBB67AE85)
_UNIFORM_SCALE = numpy.float32(4.6566127342e-10)
_NAN_ABOVE = numpy.int32(0x7F800000)
"""|τ| bits above this are NaN (+Inf's bits are this)."""


@numba.njit(inline="always")
def _philox(c0, c1, k0, k1):
    """Philox4x32-10 of the counter (c0, c1, 0, 0) under the key (k0, k1): ``rng.philox4x32``,
    uint32 words held in uint64 (the product of two words fits)."""
    c2 = numpy.uint64(0)
    c3 = numpy.uint64(0)
    for _ in range(10):
        a = _ROUND_A * c0
        b = _ROUND_B * c2
        c0, c1, c2, c3 = (b >> numpy.uint64(32)) ^ c1 ^ k0, b & _WORD, (a >> numpy.uint64(32)) ^ c3 ^ k1, a & _WORD
        k0 = (k0 + _KEY_A) & _WORD
        k1 = (k1 + _KEY_B) & _WORD
    return c0, c1, c2, c3


@numba.njit(inline="always")
def _fold(word):
    """A Philox word as Triton's ``uint_to_uniform_float`` reads it: the word as int32, ~x for a
    negative x, a value in [0, 2**31) (``rng._fold``)."""
    return numpy.int32(word if word < _HALF else _WORD - word)


@numba.njit(inline="always")
def _folded_words(seed, start, count, words):
    """words[(start & 3) + j] = the folded Philox word of element start + j (``rng._folded_block``),
    j < count: the blocks start // 4 .. (start + count − 1) // 4, four words each; ``words``
    holds at least 4 · that many."""
    k0 = numpy.uint64(seed) & _WORD
    k1 = numpy.uint64(seed) >> numpy.uint64(32)
    first = start >> 2
    for b in range(((start & 3) + count + 3) >> 2):  # no dependence between blocks: vectorizes
        counter = numpy.uint64(first + b)
        w0, w1, w2, w3 = _philox(counter & _WORD, counter >> numpy.uint64(32), k0, k1)
        words[4 * b] = _fold(w0)
        words[4 * b + 1] = _fold(w1)
        words[4 * b + 2] = _fold(w2)
        words[4 * b + 3] = _fold(w3)


@numba.njit(**_JIT)
def _draws(seed, start, below, keep):
    """keep[j] = the folded word of element start + j < below: ``rng.bernoulli_keep`` of one p.
    Whole blocks of four words straight into ``keep`` (0.45 ns a draw here, against 1.3
    through a buffer of words); the elements before the first whole block and after the last
    through ``_folded_words``. (LLVM vectorizes the loop over blocks only while it knows the
    offset of the first whole block is in [0, 3]: no min() on it.)"""
    k0 = numpy.uint64(seed) & _WORD
    k1 = numpy.uint64(seed) >> numpy.uint64(32)
    words = numpy.empty(8, numpy.int32)
    head = (-start) & 3
    if keep.size < head + 4:  # no whole block
        for j in range(keep.size):
            _folded_words(seed, start + j, 1, words)
            keep[j] = words[(start + j) & 3] < below
        return
    _folded_words(seed, start, head, words)
    for j in range(head):
        keep[j] = words[(start & 3) + j] < below
    blocks = (keep.size - head) >> 2
    first = (start + head) >> 2
    for b in range(blocks):  # no dependence between blocks: vectorizes
        counter = numpy.uint64(first + b)
        w0, w1, w2, w3 = _philox(counter & _WORD, counter >> numpy.uint64(32), k0, k1)
        j = head + 4 * b
        keep[j] = _fold(w0) < below
        keep[j + 1] = _fold(w1) < below
        keep[j + 2] = _fold(w2) < below
        keep[j + 3] = _fold(w3) < below
    rest = head + 4 * blocks
    _folded_words(seed, start + rest, keep.size - rest, words)
    for j in range(rest, keep.size):
        keep[j] = words[j - rest] < below


@numba.njit(inline="always")
def _row_ranks(keys, packed, spare, hist, ranks):
    """ranks[j] = the rank of keys[j] in its row (``sparsify._row_ranks``: 0 the smallest,
    equal keys ranked lower for a higher index): an LSD radix sort of (key, index) pairs by
    the key's four bytes, skipping a byte every key shares."""
    n = keys.size
    hist[:] = 0
    for j in range(n):
        k = keys[j]
        hist[0, k & 255] += 1
        hist[1, (k >> 8) & 255] += 1
        hist[2, (k >> 16) & 255] += 1
        hist[3, k >> 24] += 1
        packed[n - 1 - j] = (numpy.uint64(k) << numpy.uint64(32)) | numpy.uint64(j)  # higher index first
    source, target = packed, spare
    for digit in range(4):
        counts = hist[digit]
        if counts.max() == n:  # one value of this byte: already in order
            continue
        position = 0
        for v in range(256):
            c = counts[v]
            counts[v] = position
            position += c
        shift = numpy.uint64(32 + 8 * digit)
        for j in range(n):  # stable: equal bytes keep their order
            e = source[j]
            v = (e >> shift) & numpy.uint64(255)
            target[counts[v]] = e
            counts[v] += 1
        source, target = target, source
    for p in range(n):
        ranks[numpy.int64(source[p] & _WORD)] = p


@numba.njit(**_JIT)
def _magprune(base, x, columns, low, divisor, epsilon, seed, start, keep, magnitudes, kept):
    """DELLA's keep mask of whole rows (``sparsify.magprune``): entry j of a row keeps when its
    uniform draw is below pᵢ = low + (rᵢ / divisor) · 2 · ε, rᵢ the rank of |τ| in the row;
    with ``magnitudes``, |τ| and |τ| ⊙ keep into it and ``kept``. False at a NaN |τ| (the
    caller ranks those rows with torch: a sort puts every NaN above +Inf, in index order)."""
    two = numpy.float32(2.0)
    zero = numpy.float32(0.0)
    keys = numpy.empty(columns, numpy.int32)
    packed = numpy.empty(columns, numpy.uint64)
    spare = numpy.empty(columns, numpy.uint64)
    hist = numpy.empty((4, 256), numpy.int64)
    ranks = numpy.empty(columns, numpy.int64)
    words = numpy.empty(columns + 8, numpy.int32)
    sums = magnitudes.size > 0
    for row in range(base.size // columns):
        s = row * columns
        b, xr = base[s : s + columns], x[s : s + columns]  # views of the row: the loop vectorizes
        nan = False
        for j in range(columns):
            keys[j] = _magnitude_bits(_widen(xr[j]) - _widen(b[j]))
            nan |= keys[j] > _NAN_ABOVE
        if nan:
            return False
        _row_ranks(keys, packed, spare, hist, ranks)
        _folded_words(seed, start + s, columns, words)
        drawn, k = words[(start + s) & 3 :], keep[s : s + columns]
        for j in range(columns):
            p = low + (numpy.float32(ranks[j]) / divisor) * two * epsilon
            k[j] = numpy.float32(drawn[j]) * _UNIFORM_SCALE < p
        if sums:
            m, kk = magnitudes[s : s + columns], kept[s : s + columns]
            for j in range(columns):
                m[j] = numpy.int32(keys[j]).view(numpy.float32)
                kk[j] = m[j] if k[j] else zero
    return True


@numba.njit(**_JIT)
def _masked_magnitudes(base, x, keep, magnitudes, kept):
    """|τ| and |τ| ⊙ keep (+0 where dropped) into ``magnitudes`` and ``kept``; False at a NaN τ
    (found by a flag, not a return inside the loop, which kept it from vectorizing: 1.3 against
    0.6 ns an entry)."""
    zero = numpy.float32(0.0)
    nan = False
    for j in range(base.size):
        bits = _magnitude_bits(_widen(x[j]) - _widen(base[j]))
        nan |= bits > _NAN_ABOVE
        m = numpy.int32(bits).view(numpy.float32)
        magnitudes[j] = m
        kept[j] = m if keep[j] else zero
    return not nan


@numba.njit(**_JIT)
def _mask_weigh(base, x, w, keep, factor, out):
    """out[j] = ((τ[j] where keep[j], else +0) · factor) · w; returns whether some τ[j] is NaN."""
    zero = numpy.float32(0.0)
    nan = False
    for j in range(base.size):
        delta = _widen(x[j]) - _widen(base[j])
        nan |= delta != delta
        out[j] = ((delta if keep[j] else zero) * factor) * w
    return nan


@numba.njit(**_JIT)
def _masked_combine(base, xs, keeps, factors, weight, consensus, normalize, divisor, lam, scale, out):
    models = len(xs)
    weighted = numpy.empty((models, _BLOCK), numpy.float32)
    summed = numpy.empty(_BLOCK, numpy.float32)
    mixed = numpy.empty(_BLOCK, numpy.float32)
    total_weight = numpy.empty(_BLOCK, numpy.float32)
    nan = False
    for start in range(0, base.size, _BLOCK):
        end = min(base.size, start + _BLOCK)
        for i in range(models):
            nan |= _mask_weigh(base[start:end], xs[i][start:end], weight[i], keeps[i][start:end], factors[i], weighted[i])
        nan |= _combine(base[start:end], weighted, end - start, weight, consensus, normalize, divisor, lam, scale, summed, mixed, total_weight, out[start:end])
    return nan


# ---------------------------------------------------------------- sce


@numba.njit(**_JIT)
def _variances(base, xs, out):
    """out[j] = the population variance of τᵢ[j] over the models (``sce.welford_variance``:
    Welford's update in float64, models in order, M2/N rounded to float32), in blocks of
    entries model by model. Returns whether some τ is NaN."""
    models = len(xs)
    mean = numpy.empty(_BLOCK, numpy.float64)
    m2 = numpy.empty(_BLOCK, numpy.float64)
    nan = False
    for start in range(0, base.size, _BLOCK):
        n = min(base.size, start + _BLOCK) - start
        mean[:n] = 0.0
        m2[:n] = 0.0
        b = base[start : start + n]  # views of the block: loops over them vectorize
        for i in range(models):
            x, count = xs[i][start : start + n], numpy.float64(i + 1)
            for j in range(n):
                d = _widen(x[j]) - _widen(b[j])
                nan |= d != d
                value = numpy.float64(d)
                delta = value - mean[j]
                mean[j] += delta / count
                m2[j] += delta * (value - mean[j])
        o = out[start : start + n]
        for j in range(n):
            o[j] = numpy.float32(m2[j] / models)
    return nan


@numba.njit(**_JIT)
def _masked_squares(base, x, keep, out):
    """out[j] = (τ[j] where keep[j], else +0)²; returns whether some τ[j] is NaN."""
    zero = numpy.float32(0.0)
    nan = False
    for j in range(base.size):
        d = _widen(x[j]) - _widen(base[j])
        nan |= d != d
        d = d if keep[j] else zero
        out[j] = d * d
    return nan


@numba.njit(**_JIT)
def _erase_merge(base, xs, keep, eta, out):
    """``sce.erase_and_merge`` of τ̂ᵢ = τᵢ where keep, +0 elsewhere, with weights ``eta``: per
    entry γ = sgn Σᵢ τ̂ᵢ (+1 for a sum ≥ 0), eᵢ = [sgn τ̂ᵢ = γ]·ηᵢ, θ₀ + Σᵢ τ̂ᵢeᵢ / max(Σᵢ eᵢ, 1e-6),
    in blocks of entries model by model. Returns whether some τ is NaN."""
    models = len(xs)
    zero, one, floor = numpy.float32(0.0), numpy.float32(1.0), numpy.float32(1e-6)
    deltas = numpy.empty((models, _BLOCK), numpy.float32)
    summed = numpy.empty(_BLOCK, numpy.float32)
    merged = numpy.empty(_BLOCK, numpy.float32)
    total = numpy.empty(_BLOCK, numpy.float32)
    nan = False
    for start in range(0, base.size, _BLOCK):
        n = min(base.size, start + _BLOCK) - start
        b, k = base[start : start + n], keep[start : start + n]  # views of the block: loops over them vectorize
        for i in range(models):
            x, row = xs[i][start : start + n], deltas[i]
            for j in range(n):
                d = _widen(x[j]) - _widen(b[j])
                nan |= d != d
                row[j] = d if k[j] else zero
        _total(deltas, n, summed)
        merged[:n] = zero
        total[:n] = zero
        for i in range(models):
            row, weight = deltas[i], eta[i]
            for j in range(n):
                d = row[j]
                erased = (one if _agrees(d, summed[j]) else zero) * weight
                merged[j] = merged[j] + d * erased
                total[j] = total[j] + erased
        o = out[start : start + n]
        for j in range(n):
            t = total[j]
            o[j] = _widen(b[j]) + merged[j] / (t if t > floor else floor)
    return nan


# ---------------------------------------------------------------- linear


@numba.njit(**_JIT)
def _linear_into(xs, weight, normalize, total, out):
    """``reference.linear_sum`` rounded to bf16 into ``out``: acc = fma(θ₁, w₁, +0), then
    acc = fma(θᵢ, wᵢ, acc) model by model (``addcmul_``'s one rounding), divided by ``total``
    when ``normalize``, then rounded; in blocks of entries. Returns whether some result
    (before or after the rounding) is NaN or infinite."""
    zero = numpy.float32(0.0)
    acc = numpy.empty(_BLOCK, numpy.float32)
    nonfinite = False
    for start in range(0, out.size, _BLOCK):
        end = min(out.size, start + _BLOCK)
        n, first, w = end - start, xs[0][start:end], weight[0]
        for j in range(n):
            acc[j] = _fma(_widen(first[j]), w, zero)
        for i in range(1, len(xs)):
            x, w = xs[i][start:end], weight[i]
            for j in range(n):
                acc[j] = _fma(_widen(x[j]), w, acc[j])
        if normalize:
            for j in range(n):
                acc[j] = acc[j] / total
        nonfinite |= _round_into(acc, n, out[start:end])
    return nonfinite


# ---------------------------------------------------------------- model_stock


@numba.njit(**_JIT)
def _difference(base, x, tau):
    """tau = x − base; returns whether some entry is NaN."""
    nan = False
    for j in range(base.size):
        t = _widen(x[j]) - _widen(base[j])
        nan |= t != t
        tau[j] = t
    return nan


@numba.njit(**_JIT)
def _stock_pass(base, x, earlier, tau, products):
    """tau = τⱼ = x − base, products[i] = (earlier[i] − base) ⊙ τⱼ (at least one earlier
    model); returns whether some τ is NaN."""
    nan = _difference(base, x, tau)
    for i in range(len(earlier)):
        e, p = earlier[i], products[i]
        for j in range(base.size):
            d = _widen(e[j]) - _widen(base[j])
            nan |= d != d
            p[j] = d * tau[j]
    return nan


@numba.njit(**_JIT)
def _stock_interpolate(base, xs, t, out):
    """``reference.stock_interpolate`` with one ratio t: out = (Σᵢ θᵢ / N)·t + θ₀·(1 − t), the sum
    from θ₁ + 0, in blocks of entries model by model. Returns whether some input is NaN."""
    models = numpy.float32(len(xs))
    zero, rest = numpy.float32(0.0), numpy.float32(1.0) - t
    nan = False
    for start in range(0, base.size, _BLOCK):
        end = min(base.size, start + _BLOCK)
        o, b = out[start:end], base[start:end]
        first = xs[0][start:end]
        for j in range(end - start):
            v = _widen(first[j])
            nan |= v != v
            o[j] = v + zero
        for i in range(1, len(xs)):
            x = xs[i][start:end]
            for j in range(end - start):
                v = _widen(x[j])
                nan |= v != v
                o[j] = o[j] + v
        for j in range(end - start):
            w = _widen(b[j])
            nan |= w != w
            o[j] = (o[j] / models) * t + w * rest
    return nan


@numba.njit(**_JIT)
def _cascade(x, rows, width, partial, counts):
    """``reductions.Sum``'s cascade over whole blocks of ``rows`` rows of ``width`` floats (the
    flat x): level 0 adds each block's rows lane by lane in order from +0, levels 1 and 2
    (partial[0], partial[1]) add what they get and pass on their sum of every ``rows`` of it,
    restarting from +0 (counts[0], counts[1]: how many they hold), level 3 (partial[2]) adds
    what it gets."""
    block = numpy.empty(width, numpy.float32)
    for b in range(x.size // (rows * width)):
        block[:] = 0
        for r in range(rows):
            row = x[(b * rows + r) * width : (b * rows + r + 1) * width]
            for lane in range(width):
                block[lane] += row[lane]
        for lane in range(width):
            partial[0, lane] += block[lane]
        counts[0] += 1
        if counts[0] == rows:
            for lane in range(width):
                partial[1, lane] += partial[0, lane]
                partial[0, lane] = 0
            counts[0] = 0
            counts[1] += 1
            if counts[1] == rows:
                for lane in range(width):
                    partial[2, lane] += partial[1, lane]
                    partial[1, lane] = 0
                counts[1] = 0


@numba.njit(**_JIT)
def _squares8(x, lanes):
    """lanes[k mod 8] += x[k]·x[k] over x, a whole number of rows of 8 floats: each product and
    each sum rounded to float32 (no fused multiply-add), ``reductions.Norm``'s accumulator, the
    lanes held in registers: 0.16 ns an element here (0.34 in a function that also takes other
    widths, 0.7 indexed)."""
    a0, a1, a2, a3, a4, a5, a6, a7 = lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7]
    for s in range(0, x.size - x.size % 8, 8):  # (the bound a multiple of 8: twice as fast)
        a0 = a0 + x[s] * x[s]
        a1 = a1 + x[s + 1] * x[s + 1]
        a2 = a2 + x[s + 2] * x[s + 2]
        a3 = a3 + x[s + 3] * x[s + 3]
        a4 = a4 + x[s + 4] * x[s + 4]
        a5 = a5 + x[s + 5] * x[s + 5]
        a6 = a6 + x[s + 6] * x[s + 6]
        a7 = a7 + x[s + 7] * x[s + 7]
    lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7] = a0, a1, a2, a3, a4, a5, a6, a7


@numba.njit(**_JIT)
def _squares(x, lanes):
    """``_squares8`` for any number of lanes w = len(lanes)."""
    w = lanes.size
    for s in range(0, x.size, w):
        row = x[s : s + w]
        for lane in range(w):
            lanes[lane] = lanes[lane] + row[lane] * row[lane]


_LOADED: set[tuple] = set()
"""(loop, number of models, output dtype where it takes either) compiled or loaded from the
cache by this process: every call passes the same array and scalar types but for these."""


@contextlib.contextmanager
def _first_call(loop, models: int, *signature):
    """The first call of ``loop`` for ``models`` models (and the rest of its ``signature``: an
    output's dtype, where it takes either) in this process, under an exclusive
    lock on numba's cache directory. numba's cache is an index file that a process compiling
    a new signature reads, extends and writes back; two processes doing that at once (ranks,
    or a test suite's workers, on a cold cache) can give two signatures one data file
    (``numba.core.caching.IndexDataCacheFile.save``), which a third process then loads as
    the machine code of the other signature: a crash without a traceback. Under the lock the
    second process finds the first's entry and loads it."""
    key = (loop.py_func.__name__, models, *signature)
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


def _combine_args(weight: list[float], consensus: bool, normalize: bool, lambda_: float) -> tuple:
    """``_combine``'s arguments after the per-model ones: the float32 weights, the flags, the
    linear divisor (``reference.linear_divisor``; 1 with consensus, whose divisor is per entry),
    λ and whether to multiply by it."""
    w = torch.tensor(weight, dtype=torch.float32)
    divisor = numpy.float32(1.0 if consensus else float(linear_divisor(w)))
    return w.numpy(), bool(consensus), bool(normalize), divisor, numpy.float32(lambda_), lambda_ != 1


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
    """``reference.task_combine(θ₀, [τ̂ᵢ], weight, ...)`` into ``out`` (the chunk's size: float32,
    or bf16, rounded as torch rounds), τ̂ᵢ = τᵢ = θᵢ − θ₀ where |τᵢ| is in keep[i]'s selection and not in drop[i]'s,
    +0 elsewhere. A selection (c, t, n), from ``sparsify.ChunkedTopK.rule``, is the entries
    whose |τᵢ| bits exceed c, and the first n in flat order whose bits equal t.

    Returns False when some τᵢ is NaN (a NaN input, or ∞ − ∞), or, into bf16, some result is
    NaN or infinite: then ``out`` holds the right values but maybe not torch's NaN bits (a
    difference of two NaNs is torch's base's here), and the caller computes the chunk with
    torch ops instead."""
    with _first_call(_trim_combine, len(tensors), out.dtype):
        nan = _trim_combine(
            _bits(base),
            tuple(_bits(x) for x in tensors),
            numpy.asarray(keep, dtype=numpy.int64).reshape(-1, 3),
            numpy.asarray(drop, dtype=numpy.int64).reshape(-1, 3),
            *_combine_args(weight, consensus, normalize, lambda_),
            _bits(out) if out.dtype == torch.bfloat16 else out.reshape(-1).numpy(),
        )
    return not nan


def task_merge_into(
    base: torch.Tensor, tensors: list[torch.Tensor], weight: list[float], *, consensus: bool, normalize: bool, lambda_: float, out: torch.Tensor
) -> bool:
    """``reference.task_merge`` without a keep rule, of bf16 tensors (``eligible``), into ``out``
    (the base's size: float32, or bf16 rounded as torch rounds it), in one loop. False when some
    τᵢ, or into bf16 some result, is NaN or infinite (``trim_combine``)."""
    n = len(tensors)
    if consensus:  # the election reads every model's weighted block: the general loop
        flags = dict(consensus=True, normalize=normalize, lambda_=lambda_)
        return trim_combine(base, tensors, weight, [SELECT_ALL] * n, [SELECT_NONE] * n, **flags, out=out)
    w, _, normalize, divisor, lam, scale = _combine_args(weight, consensus, normalize, lambda_)
    with _first_call(_task_sum, n, out.dtype):
        nan = _task_sum(
            _bits(base), tuple(_bits(x) for x in tensors), w, normalize, divisor, lam, scale,
            _bits(out) if out.dtype == torch.bfloat16 else out.reshape(-1).numpy(),
        )  # fmt: skip
    return not nan


def task_merge(base: torch.Tensor, tensors: list[torch.Tensor], weight: list[float], *, consensus: bool, normalize: bool, lambda_: float) -> torch.Tensor | None:
    """``task_merge_into`` a fresh float32 tensor; None where some τᵢ is NaN."""
    out = torch.empty(base.shape, dtype=torch.float32)
    return out if task_merge_into(base, tensors, weight, consensus=consensus, normalize=normalize, lambda_=lambda_, out=out) else None


def bernoulli_keep(seed: int, start: int, p: float, keep: torch.Tensor) -> None:
    """keep (a flat bool tensor) = ``rng.bernoulli_keep(seed, (n,), p, offset=start)``: the same
    draws, from a vectorized Philox (0.5 ns a word here against randomgen's 5.5)."""
    with _first_call(_draws, 0):
        _draws(numpy.uint64(seed), start, rng.count_below(p), keep.numpy())


def magprune(
    base: torch.Tensor,
    x: torch.Tensor,
    columns: int,
    density: float,
    epsilon: float,
    seed: int,
    start: int,
    keep: torch.Tensor,
    magnitudes: torch.Tensor | None = None,
    kept: torch.Tensor | None = None,
) -> bool:
    """DELLA's keep mask (``sparsify.magprune``, drawn with ``rng.bernoulli_keep``) of whole rows
    of ``columns`` entries starting at flat index ``start``, into ``keep`` (bool, the chunk's
    size); with ``magnitudes`` and ``kept`` (float32), |τ| and |τ ⊙ m| too: what the L1
    rescale sums. ``density`` ± ``epsilon`` in (0, 1), ``columns`` > 1. Rows are split
    between the threads the process was given (each row ranked by one: the same bits).
    False when some |τ| is NaN: then nothing is to be trusted and the caller uses torch."""
    low, divisor, eps = numpy.float32(density - epsilon), numpy.float32(columns - 1), numpy.float32(epsilon)
    empty = numpy.empty(0, numpy.float32)
    b, xb, k = _bits(base), _bits(x), keep.numpy()
    m = magnitudes.numpy() if magnitudes is not None else empty
    kk = kept.numpy() if kept is not None else empty
    rows = base.numel() // columns
    parts = min(threads.given(), rows)
    bounds = [rows * i // parts * columns for i in range(parts + 1)]
    found = []

    def part(i: int) -> None:
        lo, hi = bounds[i], bounds[i + 1]
        sums = (m[lo:hi], kk[lo:hi]) if m.size else (empty, empty)
        found.append(_magprune(b[lo:hi], xb[lo:hi], columns, low, divisor, eps, numpy.uint64(seed), start + lo, k[lo:hi], *sums))

    with _first_call(_magprune, 0):  # compiled (or loaded) on no rows, before the threads call it
        _magprune(b[:0], xb[:0], columns, low, divisor, eps, numpy.uint64(seed), start, k[:0], empty, empty)
    threads.each(part, range(parts))
    return all(found)


def masked_magnitudes(base: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, magnitudes: torch.Tensor, kept: torch.Tensor) -> bool:
    """|τ| and |τ ⊙ keep| (float32) of bf16 chunks, τ = x − base: what the L1 rescale sums.
    False when some τ is NaN (the caller uses torch)."""
    with _first_call(_masked_magnitudes, 1):
        return bool(_masked_magnitudes(_bits(base), _bits(x), keep.numpy(), magnitudes.numpy(), kept.numpy()))


def _everywhere(keep: torch.Tensor | None, n: int) -> numpy.ndarray:
    """A keep mask as the loops take it: bool, flat; None (keep all of τ) as all True."""
    return numpy.ones(n, dtype=numpy.bool_) if keep is None else keep.reshape(-1).numpy()


def masked_combine(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    keeps: list[torch.Tensor | None],
    factors: list[torch.Tensor | None],
    weight: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    out: torch.Tensor,
) -> bool:
    """``reference.task_combine(θ₀, [τ̂ᵢ], weight, ...)`` into ``out`` (the chunk's size: float32,
    or bf16, rounded as torch rounds), τ̂ᵢ = (τᵢ where keeps[i], +0 elsewhere) · factors[i] (a 0-d float32 tensor, the L1
    rescale; None: no product, as a product by 1 is for any τ not NaN), keeps[i] None: all
    of τᵢ. False when some τᵢ is NaN (``trim_combine``)."""
    with _first_call(_masked_combine, len(tensors)):
        nan = _masked_combine(
            _bits(base),
            tuple(_bits(x) for x in tensors),
            tuple(_everywhere(k, base.numel()) for k in keeps),
            numpy.array([1.0 if f is None else float(f) for f in factors], dtype=numpy.float32),
            *_combine_args(weight, consensus, normalize, lambda_),
            _bits(out) if out.dtype == torch.bfloat16 else out.reshape(-1).numpy(),
        )
    return not nan


def cascade(blocks: torch.Tensor, partial: numpy.ndarray, counts: numpy.ndarray) -> None:
    """``reductions.Sum``'s cascade over float32 ``blocks`` (blocks, rows, width) into its
    state: ``partial`` (float32, 3 × width: levels 1, 2, 3), ``counts`` (int64, 2). 0.1 ns an
    element here, against 1.6 for torch's strided sums and numpy's groups."""
    with _first_call(_cascade, 0):
        _cascade(blocks.reshape(-1).numpy(), blocks.shape[1], blocks.shape[2], partial, counts)


def squares(x: numpy.ndarray, lanes: numpy.ndarray) -> None:
    """``reductions.Norm``'s accumulation: lanes[k mod w] += x[k]² (float32, x a whole number of
    rows of w = len(lanes))."""
    loop = _squares8 if lanes.size == 8 else _squares
    with _first_call(loop, 0):
        loop(x, lanes)


def variances(base: torch.Tensor, tensors: list[torch.Tensor], out: torch.Tensor) -> bool:
    """``sce.welford_variance`` of the task vectors τᵢ = tensors[i] − base (bf16 chunks) into
    ``out`` (float32). False when some τᵢ is NaN (the caller uses torch)."""
    with _first_call(_variances, len(tensors)):
        return not _variances(_bits(base), tuple(_bits(x) for x in tensors), out.numpy())


def masked_squares(base: torch.Tensor, x: torch.Tensor, keep: torch.Tensor | None, out: torch.Tensor) -> bool:
    """(τ ⊙ keep)² (float32, into ``out``) of bf16 chunks, τ = x − base; ``keep`` None: all of τ.
    False when some τ is NaN."""
    with _first_call(_masked_squares, 1):
        return not _masked_squares(_bits(base), _bits(x), _everywhere(keep, base.numel()), out.numpy())


def erase_merge(base: torch.Tensor, tensors: list[torch.Tensor], keep: torch.Tensor | None, weights: list[torch.Tensor], out: torch.Tensor) -> bool:
    """``sce.erase_and_merge(θ₀, [τᵢ ⊙ keep], weights)`` of bf16 chunks into ``out`` (float32);
    ``keep`` None: all of τᵢ. False when some τᵢ is NaN or a weight is not finite (then the
    caller uses torch, whose clamp keeps a NaN)."""
    eta = torch.stack(weights).to(torch.float32)
    if not bool(eta.isfinite().all()):
        return False
    with _first_call(_erase_merge, len(tensors)):
        return not _erase_merge(_bits(base), tuple(_bits(x) for x in tensors), _everywhere(keep, base.numel()), eta.numpy(), out.numpy())


def stock_pass(base: torch.Tensor, x: torch.Tensor, earlier: list[torch.Tensor], tau: torch.Tensor, products: torch.Tensor) -> bool:
    """model_stock's pass for model j over bf16 chunks: τⱼ = x − base into ``tau`` and, for each
    earlier model i, τᵢ ⊙ τⱼ into products[i] (float32). False when some τ is NaN."""
    if not earlier:
        with _first_call(_difference, 1):
            return not _difference(_bits(base), _bits(x), tau.numpy())
    with _first_call(_stock_pass, len(earlier)):
        return not _stock_pass(_bits(base), _bits(x), tuple(_bits(e) for e in earlier), tau.numpy(), products.numpy())


def stock_interpolate(base: torch.Tensor, tensors: list[torch.Tensor], t: torch.Tensor, out: torch.Tensor) -> bool:
    """``reference.stock_interpolate(base, tensors, t)`` of bf16 chunks with one ratio t (float32,
    one element) into ``out`` (float32). False when some input is NaN."""
    with _first_call(_stock_interpolate, len(tensors)):
        return not _stock_interpolate(_bits(base), tuple(_bits(x) for x in tensors), t.reshape(-1).numpy()[0], out.numpy())



def linear_into(tensors: list[torch.Tensor], weight: list[float], *, normalize: bool, out: torch.Tensor) -> bool:
    """``out`` (bf16, the tensors' size) = ``reference.linear_sum(tensors, weight, normalize)``
    rounded to bf16 as torch rounds it, of bf16 tensors (``eligible``), in one loop. False
    when some result is NaN or infinite: then ``out`` is not torch's (its NaN bits), and the
    caller merges these tensors with torch ops instead (and reports what is not finite)."""
    w = torch.tensor(weight, dtype=torch.float32)
    with _first_call(_linear_into, len(tensors)):
        return not _linear_into(tuple(_bits(x) for x in tensors), w.numpy(), bool(normalize), w.sum().numpy()[()], _bits(out))
