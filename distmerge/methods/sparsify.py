"""Sparsification of task vectors: which entries of a delta survive, and how it is rescaled.

Four ways to drop entries, as in mergekit 0.1.5's ``sparsify`` (one per paper):

- ``magnitude``: keep the k = max(1, ⌊density·n⌋) largest |δ| (TIES, 2306.01708).
- ``magnitude_outliers``: drop the ⌊γ·n⌋ largest |δ| too, keep the next ⌊density·n⌋
  (Model Breadcrumbs, 2312.06795).
- ``random``: keep each entry with probability density (DARE, 2311.03099).
- ``della_magprune``: keep with a probability that grows with |δ|'s rank in its row,
  from density − ε (smallest) to density + ε (largest) (DELLA, 2406.11617).

Each is a decision about what to keep (``top_k``, ``outliers``, ``drop``, ``magprune``: a
``distmerge.kernels`` keep rule, data the fused kernels apply) and the delta it leaves
(``magnitude``, …: δ ⊙ m, optionally rescaled, see ``kernels.reference.masked``). density ≥ 1
keeps δ itself, unrescaled, even for ``magnitude_outliers`` with γ > 0 (mergekit does the same).

**Ranking ties.** mergekit ranks with ``torch.argsort``/``torch.sort``, which on CPU is
unstable above a few dozen elements: which of several equal |δ| it keeps depends on the
sort implementation. Here every ranking uses one total order, written once in
``top_k_mask``: larger |δ| first, and among equal |δ| the lower flat index first. Without
ties this is exactly mergekit's choice.

Random draws come from ``distmerge.rng`` with one key per input, element i of a tensor
using the counter i of its row-major flat index, so a mask does not depend on chunking.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy
import torch

from distmerge import kernels, rng, threads
from distmerge.errors import MergeError
from distmerge.kernels.reference import on_device_of, sparsified

_CHUNK = 1 << 22
"""Elements per pass in the selection scans: bounds their scratch memory."""


# ---------------------------------------------------------------- top-k selection


def _select_digit(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bucket holding the k-th largest element, and that element's rank inside it.

    ``hist[b]`` counts elements in bucket b; buckets are ordered like the values.
    """
    from_top = hist.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor([k], device=hist.device)))
    bucket = hist.numel() - 1 - position
    above = int(from_top[position]) - int(hist[bucket])
    return bucket, k - above


_HIGH_HALF = 1 if sys.byteorder == "little" else 0
"""Which of the two int16 halves of an int32 in memory holds its high 16 bits."""


def _bucket_lows(bits: torch.Tensor, buckets: list[int]) -> list[torch.Tensor]:
    """For each bucket: the low 16 bits of the entries of a flat int32 tensor of non-negative
    values whose high 16 bits are that bucket, in flat order."""
    bits = bits.contiguous()
    if bits.device.type == "cpu":
        picked = torch.from_numpy(_in_buckets(bits.numpy(), buckets))
    else:
        high = bits.view(torch.int16)[_HIGH_HALF::2]  # the high halves in place: no shift
        chosen = high == buckets[0]
        for bucket in buckets[1:]:
            chosen |= high == bucket
        picked = bits[chosen]  # one selection over the chunk, however many buckets
    return _lows_by_bucket(picked, buckets)


def _lows_by_bucket(picked: torch.Tensor, buckets: list[int]) -> list[torch.Tensor]:
    """Per bucket, the low 16 bits of the int32 entries of ``picked`` whose high 16 bits are it."""
    if len(buckets) == 1:
        return [picked & 0xFFFF]  # allocated by torch: see _in_buckets
    return [picked[(picked >> 16) == bucket] & 0xFFFF for bucket in buckets]


def _in_buckets(bits: numpy.ndarray, buckets: list[int]) -> numpy.ndarray:
    """The entries of an int32 array whose high 16 bits are one of ``buckets``, in order.

    numpy, as torch's comparison of the strided high halves (125 µs per 256K entries, one
    thread) and boolean selection (271 µs) are slow in the torch build this project pins:
    ``_bucket_lows`` takes 112 µs here against 519 (one bucket), 264 against 962 (three).
    Every array here but the small result comes from torch's allocator, and the low bits
    kept per chunk are computed by torch: with numpy allocating them, its small kept arrays
    between its megabyte temporaries held 0.47 GB of freed heap (glibc) after TIES's
    statistics passes over a 65M-entry tensor, and peak RSS of ties on the benchmark's
    second data set rose by 0.1-0.3 GB."""
    high = torch.empty(bits.shape, dtype=torch.int32).numpy()  # temporaries from torch's allocator too
    chosen = torch.empty(bits.shape, dtype=torch.bool).numpy()
    numpy.right_shift(bits, 16, out=high)
    numpy.equal(high, buckets[0], out=chosen)
    for bucket in buckets[1:]:
        chosen |= high == bucket
    return bits[chosen]


def kth_largest(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of a flat float32 tensor of non-negative values (1 ≤ k ≤ n).

    A two-pass radix select: non-negative float32 values order like their bit patterns
    read as int32, so a histogram of the high 16 bits finds the bucket of the k-th
    largest, and a histogram of the low 16 bits inside that bucket finds the value.
    Unlike ``torch.kthvalue`` (which copies the tensor and allocates an int64 index of
    its size), the scratch is one chunk plus 2**16 counters.
    """
    bits = score.view(torch.int32)
    hist = torch.zeros(1 << 15, dtype=torch.int64, device=score.device)
    for chunk in bits.split(_CHUNK):
        hist += torch.bincount(chunk >> 16, minlength=1 << 15)
    high, k = _select_digit(hist, k)
    hist = torch.zeros(1 << 16, dtype=torch.int64, device=score.device)
    for chunk in bits.split(_CHUNK):
        hist += torch.bincount(_bucket_lows(chunk, [high])[0], minlength=1 << 16)
    low, _ = _select_digit(hist, k)
    return torch.tensor([(high << 16) | low], dtype=torch.int32, device=score.device).view(torch.float32)[0]


def _index_of_nth_true(mask: torch.Tensor, n: int) -> int:
    """Flat index of the n-th True (1-based) of a flat bool tensor, scanning by chunks."""
    seen = 0
    for start in range(0, mask.numel(), _CHUNK):
        chunk = mask[start : start + _CHUNK]
        count = int(chunk.sum())
        if seen + count >= n:
            return start + int(chunk.nonzero()[n - seen - 1])
        seen += count
    raise ValueError(f"fewer than {n} True entries")


def top_cut(score: torch.Tensor, k: int) -> kernels.Top:
    """The k largest of the non-negative float32 ``score`` (not NaN), ties to the lower flat
    index, as data (``kernels.Top``): the k-th largest value and the flat index of the last
    entry equal to it that is kept. The order (score descending, then flat index ascending) is
    what a stable descending sort gives; it is found with a threshold instead of a sort."""
    flat = score.reshape(-1).to(torch.float32).contiguous()
    n = flat.numel()
    if k >= n:
        return kernels.ALL
    if k <= 0:
        return kernels.NONE
    threshold = kth_largest(flat, k)
    wanted = k - int((flat > threshold).sum())
    ties = flat == threshold
    cut = _index_of_nth_true(ties, wanted) if int(ties.sum()) > wanted else n
    return kernels.Top(float(threshold), cut)


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly k entries: the k largest scores, ties to the lower flat index (``top_cut``)."""
    return kernels.reference.in_top(score.to(torch.float32), top_cut(score, k))


# ---------------------------------------------------------------- the four sparsifications


def top_count(n: int, density: float) -> int:
    """TIES's k = max(1, ⌊density·n⌋), and 0 for density ≤ 0 (or n = 0)."""
    return max(1, int(density * n)) if density > 0 and n > 0 else 0


def band_ranks(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Model Breadcrumbs' band (skip, k): drop the ⌊γ·n⌋ largest |δ| and keep the next
    k = ⌊density·n⌋; when density + γ > 1 fewer are dropped, so that k entries stay."""
    k = max(0, int(density * n))
    return n - max(0, n - k - int(gamma * n)) - k, k


def top_k(delta: torch.Tensor, density: float) -> kernels.Band | None:
    """TIES "trim": keep the k = max(1, ⌊density·n⌋) entries of largest |δ| (None: all, density ≥ 1).

    Yadav et al. 2023, "TIES-Merging" (https://arxiv.org/abs/2306.01708).
    """
    if density >= 1:
        return None
    return kernels.Band(top_cut(delta.abs(), top_count(delta.numel(), density)))


def outliers(delta: torch.Tensor, density: float, gamma: float = 0.01) -> kernels.Band | None:
    """Breadcrumbs: drop the ⌊γ·n⌋ largest |δ| (outliers) and keep the next ⌊density·n⌋ (``band_ranks``).

    Davari & Belilovsky 2023, "Model Breadcrumbs" (https://arxiv.org/abs/2312.06795).
    """
    if density >= 1:
        return None
    skip, k = band_ranks(delta.numel(), density, gamma)
    magnitudes = delta.abs()
    return kernels.Band(top_cut(magnitudes, skip + k), top_cut(magnitudes, skip))


def drop(density: float, seed: int) -> kernels.Draw | None:
    """DARE "drop": keep each entry independently with probability density: entry i keeps when
    ``rng.uniform(seed)[i] < density``.

    Yu et al. 2023, "Language models are Super Mario" (https://arxiv.org/abs/2311.03099).
    """
    return None if density >= 1 else kernels.Draw(seed, density)


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """δ with only ``top_k``'s entries, rescaled when ``rescale``."""
    return sparsified(delta, top_k(delta, density), rescale)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float = 0.01, rescale: bool = False) -> torch.Tensor:
    """δ with only ``outliers``' band, rescaled when ``rescale``."""
    return sparsified(delta, outliers(delta, density, gamma), rescale)


def random(delta: torch.Tensor, density: float, seed: int, rescale: bool = True) -> torch.Tensor:
    """δ with only ``drop``'s entries, rescaled when ``rescale``."""
    return sparsified(delta, drop(density, seed), rescale)


def _row_ranks(magnitudes: torch.Tensor) -> torch.Tensor:
    """Rank r ∈ {0..c−1} of each entry within its row (last axis), 0 = smallest, float32.

    Ties rank the lower index higher (the ``top_k_mask`` order). Rows are sorted in
    blocks of about ``_CHUNK`` entries to bound the sort's int64 scratch.
    """
    columns = magnitudes.shape[-1]
    rows = magnitudes.reshape(-1, columns)
    ranks = torch.empty_like(rows, dtype=torch.float32)
    descending = torch.arange(columns - 1, -1, -1, dtype=torch.float32, device=rows.device)
    block = max(1, _CHUNK // columns)
    with threads.every():  # each row sorted whole by one thread: the same ranks on any count (2× on 2 cores)
        for start in range(0, rows.shape[0], block):
            order = torch.sort(rows[start : start + block], dim=-1, descending=True, stable=True).indices
            ranks[start : start + block].scatter_(-1, order, descending.expand(order.shape))
    return ranks.view(magnitudes.shape)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """pᵢ = (density − ε) + 2ε · rᵢ / (c − 1), rᵢ the rank of |δᵢ| along axis 1 (c entries).

    As mergekit: ranks run along axis 1, or along the only axis of a 1-D tensor. A
    length-1 axis has no ranking (mergekit's rank normalization divides 0 by 0 and
    fails); here its entries get pᵢ = density.
    """
    x = delta.unsqueeze(0) if delta.dim() < 2 else delta
    x = x.movedim(1, -1)
    columns = x.shape[-1]
    if columns == 1:
        return torch.full_like(delta, density, dtype=torch.float32)
    rank_norm = _row_ranks(x.abs()) / on_device_of(x, columns - 1)  # (a true division on CUDA too)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return probs.movedim(-1, 1).reshape(delta.shape)


def check_della(density: float, epsilon: float) -> None:
    """MagPrune's keep probabilities density ± ε must lie in (0, 1)."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeError(
            f"della: density ± epsilon must lie in (0, 1), got density={density}, epsilon={epsilon}; "
            "choose a smaller epsilon"
        )


def magprune(delta: torch.Tensor, density: float, epsilon: float, seed: int) -> torch.Tensor | None:
    """DELLA "MagPrune": the mask keeping entry i with probability pᵢ from ``della_probabilities``
    (None: all, density ≥ 1). Entry i keeps when ``rng.uniform(seed)[i] < pᵢ``; density ± ε
    must lie in (0, 1).

    Deep et al. 2024, "DELLA-Merging" (https://arxiv.org/abs/2406.11617).
    """
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    check_della(density, epsilon)
    return rng.bernoulli_keep(seed, delta.shape, della_probabilities(delta, density, epsilon), device=delta.device)


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, seed: int, rescale: bool = True
) -> torch.Tensor:
    """δ with only ``magprune``'s entries, rescaled when ``rescale``."""
    return sparsified(delta, magprune(delta, density, epsilon, seed), rescale)


# ---------------------------------------------------------------- top-k over a tensor read in chunks


@dataclass(slots=True)
class SharedTopK:
    """What the top-k selections of one score have in common across the merges of one unit
    of work (a sweep's variants of one tensor, which read the same inputs): the high-bits
    histogram of pass 1 serves every k, and a finished selection serves every merge with its
    k. Same bits as selections made afresh; one statistics pass instead of two for a new k,
    none for a k seen before."""

    high: torch.Tensor | None = None
    finished: dict[int, ChunkedTopK] = field(default_factory=dict)

    def top_k(self, n: int, k: int) -> ChunkedTopK:
        if k in self.finished:
            return self.finished[k].replay()
        top = ChunkedTopK(n, k, shared=self)
        if self.high is not None:
            top._hist, top.has_high = self.high.clone(), True
        return top


NO_DROP = kernels.keep.SELECT_NONE
"""The ``ChunkedTopK.rule`` of a selection that keeps nothing: no entry dropped by it."""
NONE_KEPT = NO_DROP[0]
"""A cut no |δ| bit pattern exceeds."""


def _magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """|v| of a flat float32 tensor as int32 bit patterns: ≥ 0 and ordered like |v| (NaN above +Inf)."""
    return values.view(torch.int32) & 0x7FFFFFFF


class ChunkedTopK:
    """``top_k_mask(score, k)`` for a score read chunk by chunk, in flat order.

    Two statistics passes (``add_high`` over every chunk, then ``add_low`` over every
    chunk; or ``gather`` for several at once) find the k-th largest score exactly as
    ``kth_largest`` does, and how many of the entries equal to it are kept; ``mask`` then
    gives the keep mask of each chunk, taken in flat order, keeping those ties in
    flat-index order until that many are kept — the same entries ``top_k_mask`` keeps
    (``trim`` applies it to a chunk of δ in place).
    """

    def __init__(self, n: int, k: int, device="cpu", shared: SharedTopK | None = None):
        self.n, self.k = n, k
        self.trivial = k <= 0 or k >= n  # nothing or everything is kept: no statistics needed
        self.shared = shared
        self._hist = torch.zeros(1 << 15, dtype=torch.int64, device=device)
        self.has_high = False  # pass 1 is done (its histogram came from ``shared``)
        self._high: int | None = None
        self._rank = k
        self.threshold: torch.Tensor | None = None
        self._bits = 0  # the threshold's bit pattern (int32)
        self._ties_left = 0  # entries equal to the threshold still to keep
        self._ties_unseen = 0  # entries equal to the threshold in the chunks not masked yet
        self._finite = True  # no NaN or Inf score (then int32 bit patterns order like the floats compare)
        self._lows: list | None = []  # per chunk of pass 2: (size, how many of its entries are in the bucket)
        self._kept: torch.Tensor | None = None  # their low bits, chunk after chunk (``_add_lows``)
        self._lows_kept = 0
        self._chunk_ties = iter(())  # per chunk: (size, entries equal to the threshold)
        self._replay: tuple = ()  # what ``replay`` restores: the state right after ``finish``

    @property
    def needs_passes(self) -> bool:
        """Statistics passes are still to run (not trivial, not finished)."""
        return not self.trivial and self.threshold is None

    def add_high(self, score: torch.Tensor) -> None:
        """Pass 1 of 2: a chunk's scores (flat, non-negative float32) into the high-bits histogram."""
        ChunkedTopK.gather([self], score, low=False)

    def add_low(self, score: torch.Tensor) -> None:
        """Pass 2 of 2: the chunk's scores in the selected high bucket into the low-bits histogram."""
        ChunkedTopK.gather([self], score, low=True)

    @staticmethod
    def gather(tops: list[ChunkedTopK], values: torch.Tensor, *, low: bool) -> None:
        """``add_high`` (or with ``low``, ``add_low``) of one chunk for several selections of
        one score, given a flat float32 chunk whose |·| is that score (signed δ will do).

        They share the high-bits histogram, and in pass 2 one scan of the chunk picks the
        entries of all their buckets.
        """
        bits = _magnitude_bits(values)
        if not low:
            bits >>= 16
            hist = torch.bincount(bits, minlength=1 << 15)
            for top in tops:
                top._hist += hist
            return
        ChunkedTopK._add_picked(tops, bits.numel(), lambda buckets: _bucket_lows(bits, buckets))

    @staticmethod
    def gather_stored(
        selections: list[list[ChunkedTopK]], base: torch.Tensor, tensors: list[torch.Tensor], *, low: bool, counts: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """``gather`` of one chunk for every model's selections (``selections[i]``: those of
        the score |θᵢ − θ₀|, maybe none), given the stored bf16 chunks of θ₀ and the θᵢ
        (``kernels.loops.eligible``): the same statistics from one loop over the stored values
        of every model, without float32 copies (``kernels.loops``). Where a score is not
        finite, the histogram's NaN buckets may differ from ``gather``'s (which NaN a
        difference of two NaNs is): see ``nonfinite``.

        Pass 1 counts into ``counts`` (int64, a row of 2¹⁵ per model with selections; None: a
        new one) and returns it; ``add_counts`` gives them to the selections once the pass is
        over. Added to each selection chunk by chunk instead (a fresh 2¹⁵ × models histogram
        and an add per selection, 65 µs a chunk), ties on the benchmark's second data set took
        15.1–16.7 s against 14.3–14.7 s, breadcrumbs 14.9–15.1 against 13.9–14.1 s."""
        from distmerge.kernels import loops

        models = [i for i, tops in enumerate(selections) if tops]
        xs = [tensors[i] for i in models]
        if not low:
            if counts is None:
                counts = torch.zeros(len(xs), 1 << 15, dtype=torch.int64)
            loops.magnitude_histograms(base, xs, counts)
            return counts
        buckets = []
        for i in models:
            for top in selections[i]:
                top._start_low()
            buckets.append(list(dict.fromkeys(top._high for top in selections[i])))
        if any(len(b) > 2 for b in buckets):  # a sweep's many densities: one model at a time
            for i in models:
                ChunkedTopK.gather(selections[i], tensors[i].float() - base.float(), low=True)
            return
        out = torch.empty(len(xs), base.numel(), dtype=torch.int32)
        picked = loops.magnitude_selects(base, xs, [(b[0], b[-1]) for b in buckets], out)
        for i, entries in zip(models, picked):
            ChunkedTopK._add_picked(selections[i], base.numel(), lambda buckets, entries=entries: _lows_by_bucket(entries, buckets))

    @staticmethod
    def add_counts(selections: list[list[ChunkedTopK]], counts: torch.Tensor) -> None:
        """Pass 1's histograms from ``gather_stored`` into every selection of their model."""
        for row, tops in zip(counts, (tops for tops in selections if tops)):
            for top in tops:
                top._hist += row

    @staticmethod
    def _add_picked(tops: list[ChunkedTopK], size: int, lows: Callable[[list[int]], list[torch.Tensor]]) -> None:
        """Pass 2 for one chunk of ``size`` entries: ``lows(buckets)`` gives, per bucket, the
        low 16 bits of the chunk's entries in it, in flat order."""
        for top in tops:
            top._start_low()
        buckets = list(dict.fromkeys(top._high for top in tops))
        for bucket, picked in zip(buckets, lows(buckets)):
            for top in tops:
                if top._high == bucket:
                    top._add_lows(size, picked)

    def nonfinite(self) -> bool:
        """After pass 1: some score is NaN or ±Inf (it fell in their high buckets)."""
        return bool(self._hist[0x7F80:].any())

    def restart(self) -> None:
        """Forget pass 1 (to run it again another way); only before pass 2."""
        self._hist.zero_()

    def _add_lows(self, size: int, lows: torch.Tensor) -> None:
        """Pass 2 for one chunk of ``size`` entries, given the low bits of those in the bucket.

        While they are few (1/64 of the entries in all) they are kept, copied into one buffer
        allocated for the whole pass: ``finish`` histograms them at once and counts each
        chunk's ties from them (so ``trim`` need not count). A small tensor kept per chunk
        instead, allocated among the chunk's megabyte temporaries, pinned about 1 MB of freed
        heap each (glibc): 0.4 GB over TIES's low pass on a 65M-entry tensor. Past that
        many, they go into the histogram chunk by chunk.
        """
        if self._lows is None:
            self._hist += torch.bincount(lows, minlength=1 << 16)
            return
        if self._kept is None:
            self._kept = torch.empty(self.n // 64 + (1 << 16), dtype=lows.dtype, device=lows.device)
        end = self._lows_kept + lows.numel()
        if end > self._kept.numel():
            self._hist += torch.bincount(self._kept[: self._lows_kept], minlength=1 << 16)
            self._hist += torch.bincount(lows, minlength=1 << 16)
            self._lows, self._kept = None, None
            return
        self._kept[self._lows_kept : end] = lows
        self._lows.append((size, lows.numel()))
        self._lows_kept = end

    def _start_low(self) -> None:
        """Between the passes: the high bucket of the k-th largest, and the rank in it."""
        if self._high is None:
            if self.shared is not None and self.shared.high is None:
                self.shared.high = self._hist.clone()
            self._finite = not self.nonfinite()
            self._high, self._rank = _select_digit(self._hist, self.k)
            self._hist = torch.zeros(1 << 16, dtype=torch.int64, device=self._hist.device)

    def finish(self) -> None:
        """After both passes: the threshold and how many entries equal to it are kept."""
        kept = self._kept[: self._lows_kept] if self._lows else None
        if kept is not None:
            self._hist += torch.bincount(kept, minlength=1 << 16)
        low, self._ties_left = _select_digit(self._hist, self._rank)
        self._ties_unseen = int(self._hist[low])
        chunk_ties = []
        if kept is not None:
            counts = [count for _, count in self._lows]
            ties = (kept == low).split(counts)
            chunk_ties = [(size, int(t.sum())) for (size, _), t in zip(self._lows, ties)]
        self._chunk_ties = iter(chunk_ties)
        self._lows, self._kept = None, None
        self._bits = (self._high << 16) | low
        bits = torch.tensor([self._bits], dtype=torch.int32, device=self._hist.device)
        self.threshold = bits.view(torch.float32)[0]
        self._replay = (self._ties_left, self._ties_unseen, chunk_ties)
        if self.shared is not None:
            self.shared.finished[self.k] = self.replay()

    def replay(self) -> ChunkedTopK:
        """A copy of this finished selection that masks the chunks again from the first."""
        top = copy.copy(self)
        top._ties_left, top._ties_unseen, chunk_ties = self._replay
        top._chunk_ties = iter(chunk_ties)
        return top

    def mask(self, score: torch.Tensor) -> torch.Tensor:
        """The keep mask of the next chunk (chunks must come in flat order, each once)."""
        if self.trivial:
            return torch.full_like(score, self.k > 0, dtype=torch.bool)
        if self._ties_left == 0:
            return score > self.threshold
        if self._ties_left == self._ties_unseen:  # every tie left is kept
            return score >= self.threshold
        keep = score > self.threshold
        ties = score == self.threshold
        count = int(ties.sum())
        self._ties_unseen -= count
        if count > self._ties_left:
            ties[int(ties.nonzero()[self._ties_left - 1]) + 1 :] = False
            count = self._ties_left
        self._ties_left -= count
        return keep | ties

    def rule(self, size: int, count_ties: Callable[[int], int]) -> tuple[int, int, int] | None:
        """What this selection keeps of the next chunk of ``size`` entries (the chunks of the
        statistics passes, in flat order), as (c, t, n): the entries whose |δ| bits
        (``_magnitude_bits``) exceed c, and the first n in flat order whose bits equal t. None
        when the scores aren't all finite (the chunk is left to ``mask``). ``count_ties(t)``
        counts the chunk's entries with bits t (called only when the statistics passes did
        not keep that count)."""
        if self.trivial:
            return kernels.keep.SELECT_ALL if self.k > 0 else NO_DROP
        if not self._finite:
            return None
        if self._ties_left == 0:
            return self._bits, -1, 0
        if self._ties_left < self._ties_unseen:
            recorded, count = next(self._chunk_ties, (None, 0))
            if recorded != size:  # not kept: count them
                count = count_ties(self._bits)
            self._ties_unseen -= count
            if count > self._ties_left:  # the last chunk with ties kept: only its first ones
                taken, self._ties_left = self._ties_left, 0
                return self._bits, self._bits, taken
            self._ties_left -= count
        return self._bits - 1, -1, 0  # every tie of this chunk is kept

    def trim(self, delta: torch.Tensor, drop: ChunkedTopK | None = None) -> torch.Tensor:
        """The next chunk of δ (flat float32, score |δ|; the chunks of the statistics passes)
        with the entries this selection does not keep, or that ``drop`` keeps, set to +0 in
        place: ``masked(δ, mask(|δ|) & ~drop.mask(|δ|))`` (``kernels.reference``), the same bits."""
        bits = _magnitude_bits(delta)

        def count_ties(value: int) -> int:
            return int((bits == value).sum())

        keep = self.rule(bits.numel(), count_ties)
        dropped = NO_DROP if drop is None else drop.rule(bits.numel(), count_ties)
        if keep is None or dropped is None or keep[2] or dropped[2]:  # the general way, for this chunk
            score = delta.abs()
            kept = self.mask(score) if keep is None else rule_mask(bits, keep)
            if drop is not None:
                kept &= ~(drop.mask(score) if dropped is None else rule_mask(bits, dropped))
            return delta.masked_fill_(~kept, 0.0)
        # Plain cuts (no ties to count), on the bit patterns: (c − bits) >> 31 is all ones where
        # bits > c, else 0, and δ & that is δ or +0 — four int32 ops instead of float compares
        # and a ``where``.
        out = delta.view(torch.int32)
        ones = keep[0] - bits  # no overflow: -1 ≤ keep, 0 ≤ bits < 2**31
        ones >>= 31
        out &= ones
        if dropped[0] != NONE_KEPT:
            bits -= dropped[0] + 1
            bits >>= 31  # all ones where bits ≤ dropped
            out &= bits
        return delta


def rule_mask(bits: torch.Tensor, rule: tuple[int, int, int]) -> torch.Tensor:
    """The bool mask of a ``ChunkedTopK.rule`` (c, t, n) over a chunk's |δ| bits."""
    above, tie, taken = rule
    selected = bits > above
    if taken:
        ties = bits == tie
        ties[int(ties.nonzero()[taken - 1]) + 1 :] = False
        selected |= ties
    return selected


class Bits:
    """A boolean mask of ``numel`` elements kept as one bit each (numpy's packbits, little
    bit order): a 70B model's lm_head needs 131 MB per model instead of 1 GB. Written in flat
    order by ranges, ``bits[start:end] = keep``, and read by ranges, ``bits[start:end]``."""

    def __init__(self, numel: int):
        self.numel = numel
        self.packed = numpy.zeros((numel + 7) // 8, dtype=numpy.uint8)

    def __setitem__(self, where: slice, keep: torch.Tensor) -> None:
        first, offset = divmod(where.start, 8)
        values = keep.reshape(-1).numpy().view(numpy.uint8)
        if offset:  # the first byte's bits before start, as they were
            values = numpy.concatenate([numpy.unpackbits(self.packed[first : first + 1], bitorder="little")[:offset], values])
        packed = numpy.packbits(values, bitorder="little")  # a partial last byte padded with 0s: set by the next range
        self.packed[first : first + packed.size] = packed

    def __getitem__(self, where: slice) -> torch.Tensor:
        first, offset = divmod(where.start, 8)
        bits = numpy.unpackbits(self.packed[first : (where.stop + 7) // 8], bitorder="little")
        return torch.from_numpy(bits[offset : offset + where.stop - where.start]).view(torch.bool)
