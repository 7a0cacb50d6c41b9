"""Whole-tensor float32 sums with torch's bits, from chunks given in order.

DARE's and DELLA's L1 rescale divides two whole-tensor sums, Σ|τ| / Σ|τ ⊙ m|, and distmerge
matches mergekit's bits, which are torch's ``x.sum()``. A merge that reads a tensor chunk by
chunk would otherwise keep a float32 copy of what it sums (4 bytes an element: 1 GB for a
70B model's lm_head) and read its inputs once per sum. Here each chunk is folded into a few
accumulators with the additions torch makes, in its order, so the sum is torch's to the bit,
in constant memory, in the pass that computes the values.

What torch does on one CPU thread (``distmerge.threads.one``; torch 2.x,
aten/src/ATen/native/cpu/SumKernel.cpp), with L the lanes of its float vectors: rows of 4L
elements (4 vectors, its instruction-level parallelism) are added lane by lane into a level-0
accumulator, S rows at a time, S = 2**max(4, ⌈log₂ rows⌉ // 4); each block's sum is added into
level 1, which passes its sum on to level 2 every S blocks, and level 2 to level 3 every S²
blocks. The rows after the last whole block go into level 0; levels 1, 2 and 3 are added to it;
the 0–3 vectors after the last row go into its first vector, then its other three vectors are
added to that one; the elements after the last vector are summed one by one from +0, and the
L lanes added to that in order. Every accumulator starts at +0, as in the C++ code, so even
the sign of a zero sum is the same (``Sum``). Fewer than L elements in all take torch's scalar
loop, whose order is not that (it differs from adding one by one at 5, 6 and 7 elements, and
from 4 accumulators in turn at 6 and 7): those few are kept and summed by torch itself.

L is found once per process by comparing with torch itself (``lanes``): 8 on this project's
machines, whose torch reports AVX-512. Where no width reproduces torch, ``total`` returns a
``Buffered`` sum: the chunks copied into one float32 tensor that torch sums at the end, the
memory this module otherwise saves.

``torch.linalg.vector_norm`` (``Norm``) is simpler: x·x added into one vector of L lanes from
+0, vector after vector (each product and each sum rounded: no fused multiply-add), the lanes
added in order from +0, then the squares of the last numel mod L elements one by one, and the
square root. A sequential scan: in numpy it cost 2.3 ns an element against 0.15 for torch
over a buffer; numba's loop (``kernels.loops.squares``) takes 0.17, so model_stock streams
its norms too, without the float32 copy of each task vector it kept for torch's norm. The
width is found by comparing with torch (``norm_lanes``); where none reproduces it,
model_stock keeps the copy.
"""

from __future__ import annotations

import functools

import numpy
import torch

from distmerge import kernels, threads

__all__ = ["Buffered", "Norm", "Sum", "lanes", "norm_lanes", "total"]

_F32 = numpy.float32
_LEVELS = 4
"""torch's cascade depth."""
_ILP = 4
"""Vectors per row of the cascade."""


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def _feed(vectors: numpy.ndarray, size: int, acc: numpy.ndarray, counts: numpy.ndarray, level: int) -> numpy.ndarray:
    """Vectors into one level of the cascade above level 0: ``acc`` is the running sum of its
    current group of ``size`` vectors (counts[level] of them so far); returns the sums of the
    groups these vectors finish (each started from +0, added in order), to pass on."""
    finished = []
    if counts[level]:
        take = min(size - int(counts[level]), len(vectors))
        for row in vectors[:take]:
            acc += row
        counts[level] += take
        vectors = vectors[take:]
        if counts[level] < size:
            return vectors[:0]
        finished.append(acc[None].copy())
        acc[:] = 0
        counts[level] = 0
    groups = len(vectors) // size
    if groups:
        finished.append(_group_sums(vectors[: groups * size].reshape(groups, size, -1)))
    for row in vectors[groups * size :]:
        acc += row
        counts[level] += 1
    return numpy.concatenate(finished) if finished else vectors[:0]


def _group_sums(grouped: numpy.ndarray) -> numpy.ndarray:
    """(groups, size, width) → each group's rows added in order from +0: (groups, width)."""
    sums = numpy.zeros((grouped.shape[0], grouped.shape[2]), _F32)
    for i in range(grouped.shape[1]):
        sums += grouped[:, i]
    return sums


class Sum:
    """``torch.sum`` of a flat float32 tensor of ``numel`` elements, added chunk by chunk in
    flat order (``add``), on one thread, for vectors of ``width`` lanes (``lanes``)."""

    def __init__(self, numel: int, width: int):
        self.numel, self.width = numel, width
        self.row = _ILP * width
        self.rows = numel // self.row
        self.step = 1 << max(4, _ceil_log2(self.rows) // _LEVELS)  # rows per level-0 block
        self.block = self.step * self.row
        self.partial = numpy.zeros((_LEVELS - 1, self.row), _F32)  # levels 1, 2 and 3 (which never passes on)
        self.counts = numpy.zeros(_LEVELS - 2, numpy.int64)  # vectors in the current group of levels 1 and 2
        self.pending = numpy.empty(self.block, _F32)  # the start of a block not yet whole
        self.filled = 0
        self.seen = 0

    @numpy.errstate(all="ignore")  # Inf and NaN add up as in torch, without warnings
    def add(self, chunk: torch.Tensor) -> None:
        x = chunk.detach().reshape(-1).to(torch.float32)
        self.seen += x.numel()
        if self.seen > self.numel:
            raise ValueError(f"more than the {self.numel} elements announced")
        if self.filled:
            take = min(self.block - self.filled, x.numel())
            self.pending[self.filled : self.filled + take] = x[:take].numpy()
            self.filled += take
            x = x[take:]
            if self.filled < self.block:
                return
            self._blocks(torch.from_numpy(self.pending).view(1, self.step, self.row))
            self.filled = 0
        whole = x.numel() // self.block * self.block
        if whole:
            self._blocks(x[:whole].view(-1, self.step, self.row))
        rest = x[whole:].numpy()
        self.pending[: rest.size] = rest
        self.filled = rest.size

    def _blocks(self, blocks: torch.Tensor) -> None:
        """Whole blocks (blocks, step, row) through the cascade: numba's loop
        (``kernels.loops.cascade``), or torch's sums for level 0 and numpy for the others."""
        if kernels.loops_available():
            from distmerge.kernels import loops  # imported on first use: it needs numba

            loops.cascade(blocks, self.partial, self.counts)
            return
        # Level 0: each block's rows added lane by lane in order from +0. torch's own sum over
        # 16 rows does exactly that (its cascade starts after 16: a block is at least 16 rows);
        # the rows past 16 of larger blocks are added one after the other.
        sums = blocks[:, :16].sum(dim=1)
        for i in range(16, self.step):
            sums += blocks[:, i]
        sums = sums.numpy()
        for level in range(_LEVELS - 2):
            sums = _feed(sums, self.step, self.partial[level], self.counts, level)
        for row in sums:
            self.partial[-1] += row

    @numpy.errstate(all="ignore")
    def result(self) -> torch.Tensor:
        """The sum (a 0-d float32 tensor), once every element was added."""
        if self.seen != self.numel:
            raise ValueError(f"{self.seen} of {self.numel} elements added")
        tail = self.pending[: self.filled]
        if self.numel < self.width:  # not one whole vector: torch's scalar loop sums these few itself
            with threads.one():
                return torch.from_numpy(tail.copy()).sum()
        rows = tail.size // self.row  # the rows after the last whole block (fewer than a block's)
        acc = _group_sums(tail[: rows * self.row].reshape(1, rows, self.row))[0]
        for level in self.partial:
            acc += level
        w = self.width
        vectors = acc.reshape(_ILP, w)
        first = vectors[0].copy()
        start = rows * self.row
        extra = (self.numel // w) - self.rows * _ILP  # whole vectors after the last row
        for k in range(extra):
            first += tail[start + k * w : start + (k + 1) * w]
        for k in range(1, _ILP):
            first += vectors[k]
        value = _F32(0)
        for x in tail[start + extra * w :]:
            value = _F32(value + x)
        for x in first:
            value = _F32(value + x)
        return torch.tensor(_F32(0) + value, dtype=torch.float32)


class Buffered:
    """The fallback: the chunks copied into one float32 tensor that torch sums at the end."""

    def __init__(self, numel: int):
        self.buffer = torch.empty(numel)
        self.seen = 0

    def add(self, chunk: torch.Tensor) -> None:
        n = chunk.numel()
        self.buffer[self.seen : self.seen + n] = chunk.reshape(-1)
        self.seen += n

    def result(self) -> torch.Tensor:
        with threads.one():
            value = self.buffer.sum()
        self.buffer = None
        return value


def total(numel: int, streamed: bool = True) -> Sum | Buffered:
    """An accumulator for ``x.sum()`` of a flat float32 tensor of ``numel`` elements given in
    chunks (``add``, then ``result``): streamed when this torch's bits are reproduced here."""
    width = lanes() if streamed else None
    return Sum(numel, width) if width else Buffered(numel)


PROBE_SIZES = (1, 6, 7, 8, 31, 33, 100, 4099, 65_571, 300_001, (1 << 21) + 12_345)
"""Sizes compared with torch by ``lanes``: every tail case, and all four cascade levels."""


@functools.cache
def lanes() -> int | None:
    """The vector width (floats) with which ``Sum`` gives torch's bits for ``x.sum()`` on one
    thread here, checked once per process on random tensors of ``PROBE_SIZES`` (values spread
    over many magnitudes, so a different order of additions shows); None where none does."""
    generator = torch.Generator().manual_seed(0)
    probes = [torch.randn(n, generator=generator) * torch.exp(3 * torch.randn(n, generator=generator)) for n in PROBE_SIZES]
    probes.append(-torch.zeros(40))  # a sum of −0s is +0
    return _reproducing_width(Sum, torch.sum, probes)


def _reproducing_width(accumulator, reduce, probes: list[torch.Tensor]) -> int | None:
    """The first of 8, 16 and 4 lanes with which ``accumulator(numel, width)``, given each probe
    in chunks that cut blocks and vectors anywhere, has the bits of ``reduce(probe)`` on one
    thread; None if none has."""
    with threads.one():
        expected = [_bits(reduce(x)) for x in probes]
    with threads.every():  # as the element-wise passes that feed an accumulator run
        for width in (8, 16, 4):
            if all(_bits(_streamed(accumulator, x, width)) == e for x, e in zip(probes, expected)):
                return width
    return None


def _streamed(accumulator, x: torch.Tensor, width: int) -> torch.Tensor:
    acc = accumulator(x.numel(), width)
    for part in x.split(65_536 + 7):
        acc.add(part)
    return acc.result()


def _bits(x: torch.Tensor) -> int:
    return int(x.reshape(1).view(torch.int32)[0])


class Norm:
    """``torch.linalg.vector_norm`` (2-norm, one thread) of a flat float32 tensor of ``numel``
    elements, added chunk by chunk in flat order (``add``), for vectors of ``width`` lanes
    (``norm_lanes``). Needs numba (``kernels.loops``)."""

    def __init__(self, numel: int, width: int):
        self.numel, self.width = numel, width
        self.lanes = numpy.zeros(width, _F32)
        self.pending = numpy.empty(width, _F32)  # the start of a vector not yet whole
        self.filled = 0
        self.seen = 0

    @numpy.errstate(all="ignore")
    def add(self, chunk: torch.Tensor) -> None:
        from distmerge.kernels import loops  # imported on first use: it needs numba

        x = chunk.detach().reshape(-1).to(torch.float32).numpy()
        self.seen += x.size
        if self.seen > self.numel:
            raise ValueError(f"more than the {self.numel} elements announced")
        if self.filled:
            take = min(self.width - self.filled, x.size)
            self.pending[self.filled : self.filled + take] = x[:take]
            self.filled += take
            x = x[take:]
            if self.filled < self.width:
                return
            loops.squares(self.pending, self.lanes)
            self.filled = 0
        whole = x.size // self.width * self.width
        if whole:
            loops.squares(x[:whole], self.lanes)
        self.pending[: x.size - whole] = x[whole:]
        self.filled = x.size - whole

    @numpy.errstate(all="ignore")
    def result(self) -> torch.Tensor:
        """The norm (a 0-d float32 tensor), once every element was added."""
        if self.seen != self.numel:
            raise ValueError(f"{self.seen} of {self.numel} elements added")
        tail = self.pending[: self.filled]
        if self.numel < self.width:  # not one whole vector: torch's scalar loop, whose order is its own
            with threads.one():
                return torch.linalg.vector_norm(torch.from_numpy(tail.copy()))
        value = _F32(0)
        for lane in self.lanes:
            value = _F32(value + lane)
        for x in tail:
            value = _F32(value + _F32(x * x))
        return torch.tensor(numpy.sqrt(value, dtype=_F32), dtype=torch.float32)


NORM_PROBE_SIZES = (1, 7, 8, 9, 31, 33, 100, 4099, 65_571, 300_001, (1 << 21) + 12_345)


@functools.cache
def norm_lanes() -> int | None:
    """The vector width (floats) with which ``Norm`` gives torch's bits for
    ``torch.linalg.vector_norm(x)`` on one thread here, checked once per process (as ``lanes``);
    None where none does, or where numba's loops are not available."""
    if not kernels.loops_available():
        return None
    generator = torch.Generator().manual_seed(1)
    probes = [torch.randn(n, generator=generator) * torch.exp(2 * torch.randn(n, generator=generator)) for n in NORM_PROBE_SIZES]
    probes.append(torch.zeros(40))
    return _reproducing_width(Norm, torch.linalg.vector_norm, probes)
