"""Counter-based random numbers: Philox4x32-10, bit-exact with Triton's ``tl.randint4x``.

A draw is a pure function of ``(key, element index)``, never of a generator's state, so
the same recipe gives the same masks on any number of ranks, in any order, in chunks
or whole, on CPU here or in a GPU kernel. Element i gets output word i mod 4 of the
Philox block for counter i div 4, that is word ``i % 4`` of Triton's
``tl.randint4x(seed, i // 4)``: one block serves four elements (a third of the cost of
one block per element on CPU, measured: 21 against 55 ns per draw).

Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3",
https://www.thesalmons.org/john/random123/papers/random123sc11.pdf) maps a 128-bit
counter (c0, c1, c2, c3) and a 64-bit key (k0, k1) through 10 rounds of::

    hi_a, lo_a = mulhilo(0xD2511F53, c0)     hi_b, lo_b = mulhilo(0xCD9E8D57, c2)
    (c0, c1, c2, c3) = (hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a)
    (k0, k1) += (0x9E3779B9, 0xBB67AE85)      (mod 2**32)

Triton's ``randint4x(seed, c)`` uses key = (seed & 0xFFFFFFFF, seed >> 32) and counter =
(c & 0xFFFFFFFF, c >> 32, 0, 0) and returns the four output words; a word x becomes a
float32 in [0, 1) as Triton's ``uint_to_uniform_float`` does it: ``float32(x if x < 2**31
else ~x & 0x7FFFFFFF) * float32(4.6566127342e-10)``.

On CPU the words come from randomgen's Philox4x32-10, written in C (``_c_words``); on other
devices the same arithmetic runs as tensor ops on int64 tensors holding uint32 values
(``philox4x32``). tests/test_rng.py checks both against Random123's known answers, a scalar
Python Philox and each other.
"""

from __future__ import annotations

import functools
import hashlib

import numpy
import torch

from distmerge import threads

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUNDS = 10
_UNIFORM_SCALE = 4.6566127342e-10
"""Triton's float scale: the largest value with (2**31 - 1) * scale < 1 in float32."""
_MAX_FOLDED = (1 << 31) - 1
"""The largest folded word (``_folded_block``)."""
CHUNK = 1 << 17
"""Elements per vectorized block (a quarter as many counters). Small enough for the scratch
(a few int64 words per counter) to stay in cache and at torch's intra-op parallel grain
(32768 counters), which on a busy host costs more than it gains."""


def derive_seed(recipe_seed: int, *parts: str) -> int:
    """A 63-bit Philox key from the recipe seed and names (output tensor, input model).

    Uses blake2b, so the key is the same in every process and Python version (Python's
    ``hash()`` of a str is salted per process). Parts are length-prefixed, so
    ("ab", "c") and ("a", "bc") give different keys.
    """
    h = hashlib.blake2b(digest_size=8, person=b"distmerge.rng")
    h.update(int(recipe_seed).to_bytes(16, "little", signed=True))
    for part in parts:
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a·b >> 32, a·b & 0xFFFFFFFF) for a constant a and a tensor b of uint32 values.

    a·b < 2**64 may pass int64's range; torch's int64 product then wraps modulo 2**64
    (two's complement, on CPU and CUDA), which keeps all 64 low bits exact: the two
    32-bit halves are read back with masks. The Philox test vectors in tests/test_rng.py
    check this on the running platform.
    """
    product = b * a
    hi = (product >> 32).bitwise_and_(_MASK32)
    return hi, product.bitwise_and_(_MASK32)


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int, rounds: int = _ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 on int64 tensors of uint32 counter words, with a (k0, k1) key."""
    for _ in range(rounds):
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        c0 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = hi_a.bitwise_xor_(c3).bitwise_xor_(k1)
        c1, c3 = lo_b, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _check_key(seed: int) -> None:
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"Philox key must be in [0, 2**64), got {seed}")


def _randint_block(seed: int, start: int, count: int, device: torch.device | str | None) -> torch.Tensor:
    """The words of elements start .. start+count-1 (int64 holding uint32): element i is
    word i % 4 of the Philox block for counter i // 4. On CPU from randomgen's Philox in C
    (``_c_words``), on other devices from ``philox4x32``'s tensor ops: the same words."""
    if _on_cpu(device):
        return torch.from_numpy(_c_words(seed, start, count).astype(numpy.int64))
    return _tensor_words(seed, start, count, device)


def _tensor_words(seed: int, start: int, count: int, device: torch.device | str | None) -> torch.Tensor:
    """``_randint_block`` by ``philox4x32``'s tensor ops, on any device."""
    counter = torch.arange(start >> 2, ((start + count - 1) >> 2) + 1, dtype=torch.int64, device=device)
    c0, c1 = counter & _MASK32, counter >> 32
    zero = torch.zeros_like(c0)
    words = torch.stack(philox4x32(c0, c1, zero, zero, seed & _MASK32, seed >> 32), dim=1).reshape(-1)
    return words[start & 3 : (start & 3) + count]


def _on_cpu(device: torch.device | str | None) -> bool:
    return torch.device(device or "cpu").type == "cpu"


def _c_words(seed: int, start: int, count: int) -> numpy.ndarray:
    """``_randint_block``'s words as uint32, on CPU: randomgen's Philox4x32-10 with Triton's key
    (seed's low and high words) and counter (the block index as one 128-bit number), 4 ns a
    word against the tensor ops' 14 (measured side by side, one thread). randomgen adds one to
    its counter *before* each block, so it starts one below the first block; ``integers``
    over the full uint32 range returns its 32-bit words one by one, in block order."""
    import randomgen  # here, not at the top: 0.08 s of every command's start-up, for DARE's draws only

    first = start >> 2
    philox = randomgen.Philox(counter=(first - 1) % (1 << 128), key=seed, number=4, width=32)
    skip = start & 3
    return numpy.random.Generator(philox).integers(0, 1 << 32, size=skip + count, dtype=numpy.uint32)[skip:]


def _folded_block(seed: int, start: int, count: int, device: torch.device | str | None) -> torch.Tensor:
    """The words of ``_randint_block`` as Triton's ``uint_to_uniform_float`` reads them before
    scaling: the word as int32 x, negatives mapped by ~x, a value in [0, 2**31). On CPU,
    int32 (``_fold_into``); elsewhere int64."""
    if _on_cpu(device):
        out = numpy.empty(count, dtype=numpy.int32)
        _fold_into(_c_words(seed, start, count), out)
        return torch.from_numpy(out)
    return _fold(_tensor_words(seed, start, count, device))


def _fold_into(words: numpy.ndarray, out: numpy.ndarray) -> None:
    """out = the uint32 ``words`` folded as ``_folded_block`` folds them, as int32: x ^ (x >> 31)
    is ~x for negative x, x otherwise."""
    x = words.view(numpy.int32)
    numpy.right_shift(x, 31, out=out)
    numpy.bitwise_xor(x, out, out=out)


def _fold(x: torch.Tensor) -> torch.Tensor:
    """``_folded_block``'s fold of words x in [0, 2**32) held in int64: min(x, x ^ 0xFFFFFFFF)."""
    return torch.minimum(x, x ^ _MASK32)


def _to_uniform(folded: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` of folded words (what ``tl.rand`` applies to its
    word): float32 [0, 1)."""
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=folded.device)


@functools.lru_cache(maxsize=64)
def count_below(p: float) -> int:
    """The number of folded words y in [0, 2**31) whose uniform float32(y)·scale is below the
    float32 probability p. That float is non-decreasing in y, so u < p exactly when y < this
    count: a Bernoulli draw with one probability compares integers (found by bisection, once
    per probability)."""
    scale = torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)
    p = torch.tensor(p, dtype=torch.float32)
    lo, hi = 0, 1 << 31  # the answer lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if torch.tensor(mid, dtype=torch.float32) * scale < p:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _fold_below(words: numpy.ndarray, below: int, out: numpy.ndarray) -> None:
    """out = (folded word < below) for uint32 ``words`` (overwritten), below < 2**31, in two
    passes without the fold: a word w folds below b exactly when w < b or w ≥ 2**32 − b, that
    is when (w + b) mod 2**32 < 2b."""
    numpy.add(words, numpy.uint32(below), out=words)
    numpy.less(words, numpy.uint32(2 * below), out=out)


def randint(seed: int, numel: int, offset: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """uint32 draws as int64: element i is word j % 4 of ``tl.randint4x(seed, j // 4)``, j = offset + i
    (reinterpreted unsigned)."""
    _check_key(seed)
    out = torch.empty(numel, dtype=torch.int64, device=device)
    for start in range(0, numel, CHUNK):
        count = min(CHUNK, numel - start)
        out[start : start + count] = _randint_block(seed, offset + start, count, device)
    return out


def uniform(seed: int, numel: int, offset: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """float32 in [0, 1): element i is ``randint(seed)[offset + i]`` as Triton's ``uint_to_uniform_float``.

    Element i depends only on (seed, offset + i), so ``uniform(s, n, offset=k)`` equals
    ``uniform(s, n + k)[k:]``: splitting a tensor into chunks or shards never changes a draw.
    """
    _check_key(seed)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for start in range(0, numel, CHUNK):
        count = min(CHUNK, numel - start)
        out[start : start + count] = _to_uniform(_folded_block(seed, offset + start, count, device))
    return out


def bernoulli_keep(
    seed: int,
    shape: torch.Size | tuple[int, ...],
    p: float | torch.Tensor,
    offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask, True with probability p: element i (row-major) keeps when u_i < p.

    ``p`` is a float (one probability) or a float32 tensor of ``shape`` (one per element).
    The comparison is in float32, as a kernel comparing ``tl.rand`` with a float32 p does.
    """
    shape = torch.Size(shape)
    numel = shape.numel()
    if isinstance(p, torch.Tensor):
        if p.shape != shape:
            raise ValueError(f"probabilities have shape {tuple(p.shape)}, expected {tuple(shape)}")
        probs = p.to(torch.float32).reshape(-1)
    else:
        probs = torch.tensor(p, dtype=torch.float32, device=device)
    _check_key(seed)
    below = count_below(float(probs)) if probs.dim() == 0 else None
    if below is not None and below > _MAX_FOLDED:  # p above every uniform
        return torch.ones(shape, dtype=torch.bool, device=device)
    keep = torch.empty(numel, dtype=torch.bool, device=device)
    starts = range(0, numel, CHUNK)
    if _on_cpu(device):  # the words in C, block by block
        out = keep.numpy() if below is not None else numpy.empty(numel, dtype=numpy.int32)

        def block(start: int) -> None:
            words = _c_words(seed, offset + start, min(CHUNK, numel - start))
            if below is not None:
                _fold_below(words, below, out=out[start : start + CHUNK])
            else:
                _fold_into(words, out[start : start + CHUNK])

        if below is not None:  # one p: DARE draws whole masks while torch is idle, on every thread given
            threads.each(block, starts)
            return keep.reshape(shape)
        for start in starts:  # p per element: DELLA draws chunk by chunk beside torch's threads,
            block(start)  # where a pool competed with them (della 142.1 s pooled, 128.7 s not)
        for start in starts:  # the comparison with each element's p: torch, on this thread
            folded = torch.from_numpy(out[start : start + CHUNK])
            keep[start : start + CHUNK] = _to_uniform(folded) < probs[start : start + CHUNK]
        return keep.reshape(shape)
    for start in starts:
        count = min(CHUNK, numel - start)
        if below is None:
            keep[start : start + count] = _to_uniform(_folded_block(seed, offset + start, count, device)) < probs[start : start + count]
        else:
            keep[start : start + count] = _folded_block(seed, offset + start, count, device) < below
    return keep.reshape(shape)


def sample_indices(seed: int, count: int, population: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``count`` indices drawn uniformly, with replacement, from range(population).

    Index i is floor(r_i · population / 2**32) for the uint32 draw r_i = randint(seed, i)
    (Lemire's multiply-shift; bias below population / 2**32). The product is split in
    16-bit halves of ``population`` to stay within int64.
    """
    if not 0 < population < 1 << 47:
        raise ValueError(f"population must be in [1, 2**47), got {population}")
    r = randint(seed, count, device=device)
    high = r * (population >> 16)
    low = (r * (population & 0xFFFF)) >> 16
    return (high + low) >> 16
