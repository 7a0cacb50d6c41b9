"""Sparsification of task vectors: which entries of a delta survive, and how it is rescaled.

Four ways to drop entries, as in mergekit 0.1.5's ``sparsify`` (one per paper):

- ``magnitude``: keep the k = max(1, ⌊density·n⌋) largest |δ| (TIES, 2306.01708).
- ``magnitude_outliers``: drop the ⌊γ·n⌋ largest |δ| too, keep the next ⌊density·n⌋
  (Model Breadcrumbs, 2312.06795).
- ``random``: keep each entry with probability density (DARE, 2311.03099).
- ``della_magprune``: keep with a probability that grows with |δ|'s rank in its row,
  from density − ε (smallest) to density + ε (largest) (DELLA, 2406.11617).

Each returns δ ⊙ m, optionally rescaled (see ``masked``). density ≥ 1 returns δ itself,
unrescaled, even for ``magnitude_outliers`` with γ > 0 (mergekit does the same).

**Ranking ties.** mergekit ranks with ``torch.argsort``/``torch.sort``, which on CPU is
unstable above a few dozen elements: which of several equal |δ| it keeps depends on the
sort implementation. Here every ranking uses one total order, written once in
``top_k_mask``: larger |δ| first, and among equal |δ| the lower flat index first. Without
ties this is exactly mergekit's choice.

Random draws come from ``distmerge.rng`` with one key per input, element i of a tensor
using the counter i of its row-major flat index, so a mask does not depend on chunking.
"""

from __future__ import annotations

import torch

from distmerge import rng
from distmerge.errors import MergeError

RESCALE_EPS = 1e-7
"""Below this L1 norm (before or after masking) mergekit returns the mask unrescaled."""
_CHUNK = 1 << 22
"""Elements per pass in the selection scans: bounds their scratch memory."""


def masked(delta: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """δ ⊙ m, times ‖δ‖₁ / ‖δ ⊙ m‖₁ when ``rescale``.

    This is what "rescale" means in mergekit 0.1.5 for every sparsification: the kept
    entries are scaled so the L1 norm of the delta is preserved. It is not DARE's
    1/density (the two agree only in expectation, for random drops). Both norms below
    1e-7 leave the masked delta unscaled.
    """
    kept = torch.where(keep, delta, 0.0)
    if not rescale:
        return kept
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


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
        hist += torch.bincount(chunk[(chunk >> 16) == high] & 0xFFFF, minlength=1 << 16)
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


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly k entries: the k largest scores, ties to the lower flat index.

    The order (score descending, then flat index ascending) is what a stable descending
    sort gives; the entries are found with a threshold and a mask instead of a sort.
    Scores must be non-negative float32 (magnitudes, variances) and not NaN.
    """
    flat = score.reshape(-1).to(torch.float32).contiguous()
    n = flat.numel()
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    threshold = kth_largest(flat, k)
    keep = flat > threshold
    ties = flat == threshold
    wanted = k - int(keep.sum())
    if int(ties.sum()) > wanted:
        ties[_index_of_nth_true(ties, wanted) + 1 :] = False
    return (keep | ties).view(score.shape)


# ---------------------------------------------------------------- the four methods


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the k = max(1, ⌊density·n⌋) entries of largest |δ| (TIES "trim").

    Yadav et al. 2023, "TIES-Merging" (https://arxiv.org/abs/2306.01708).
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    return masked(delta, top_k_mask(delta.abs(), k), rescale)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float = 0.01, rescale: bool = False) -> torch.Tensor:
    """Drop the ⌊γ·n⌋ largest |δ| (outliers) and keep the next ⌊density·n⌋.

    Davari & Belilovsky 2023, "Model Breadcrumbs" (https://arxiv.org/abs/2312.06795).
    When density + γ > 1 fewer outliers are dropped so that ⌊density·n⌋ entries stay
    (mergekit keeps the ⌊density·n⌋ smallest then).
    """
    if density >= 1:
        return delta
    n = delta.numel()
    target = max(0, int(density * n))
    dropped_top = n - max(0, n - target - int(gamma * n)) - target
    magnitudes = delta.abs()
    keep = top_k_mask(magnitudes, dropped_top + target) & ~top_k_mask(magnitudes, dropped_top)
    return masked(delta, keep, rescale)


def random(delta: torch.Tensor, density: float, seed: int, rescale: bool = True) -> torch.Tensor:
    """Keep each entry independently with probability density (DARE "drop").

    Yu et al. 2023, "Language models are Super Mario" (https://arxiv.org/abs/2311.03099).
    Entry i keeps when ``rng.uniform(seed)[i] < density``.
    """
    if density >= 1:
        return delta
    keep = rng.bernoulli_keep(seed, delta.shape, density, device=delta.device)
    return masked(delta, keep, rescale)


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
    rank_norm = _row_ranks(x.abs()) / (columns - 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return probs.movedim(-1, 1).reshape(delta.shape)


def check_della(density: float, epsilon: float) -> None:
    """MagPrune's keep probabilities density ± ε must lie in (0, 1)."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeError(
            f"della: density ± epsilon must lie in (0, 1), got density={density}, epsilon={epsilon}; "
            "choose a smaller epsilon"
        )


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, seed: int, rescale: bool = True
) -> torch.Tensor:
    """Keep entry i with probability pᵢ from ``della_probabilities`` (DELLA "MagPrune").

    Deep et al. 2024, "DELLA-Merging" (https://arxiv.org/abs/2406.11617). Entry i keeps
    when ``rng.uniform(seed)[i] < pᵢ``. density ± ε must lie in (0, 1).
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    check_della(density, epsilon)
    keep = rng.bernoulli_keep(seed, delta.shape, della_probabilities(delta, density, epsilon), device=delta.device)
    return masked(delta, keep, rescale)


# ---------------------------------------------------------------- top-k over a tensor read in chunks


class ChunkedTopK:
    """``top_k_mask(score, k)`` for a score read chunk by chunk, in flat order.

    Two statistics passes (``add_high`` over every chunk, then ``add_low`` over every
    chunk) find the k-th largest score exactly as ``kth_largest`` does, and how many of
    the entries equal to it are kept; ``mask`` then gives the keep mask of each chunk,
    taken in flat order, keeping those ties in flat-index order until that many are
    kept — the same entries ``top_k_mask`` keeps.
    """

    def __init__(self, n: int, k: int, device="cpu"):
        self.n, self.k = n, k
        self.trivial = k <= 0 or k >= n  # nothing or everything is kept: no statistics needed
        self._hist = torch.zeros(1 << 15, dtype=torch.int64, device=device)
        self._high: int | None = None
        self._rank = k
        self.threshold: torch.Tensor | None = None
        self._ties_left = 0

    def add_high(self, score: torch.Tensor) -> None:
        """Pass 1 of 2: a chunk's scores (flat, non-negative float32) into the high-bits histogram."""
        self._hist += torch.bincount(score.view(torch.int32) >> 16, minlength=1 << 15)

    def add_low(self, score: torch.Tensor) -> None:
        """Pass 2 of 2: the chunk's scores in the selected high bucket into the low-bits histogram."""
        if self._high is None:
            self._high, self._rank = _select_digit(self._hist, self.k)
            self._hist = torch.zeros(1 << 16, dtype=torch.int64, device=self._hist.device)
        bits = score.view(torch.int32)
        self._hist += torch.bincount(bits[(bits >> 16) == self._high] & 0xFFFF, minlength=1 << 16)

    def finish(self) -> None:
        """After both passes: the threshold and how many entries equal to it are kept."""
        low, self._ties_left = _select_digit(self._hist, self._rank)
        bits = torch.tensor([(self._high << 16) | low], dtype=torch.int32, device=self._hist.device)
        self.threshold = bits.view(torch.float32)[0]

    def mask(self, score: torch.Tensor) -> torch.Tensor:
        """The keep mask of the next chunk (chunks must come in flat order, each once)."""
        if self.trivial:
            return torch.full_like(score, self.k > 0, dtype=torch.bool)
        keep = score > self.threshold
        ties = score == self.threshold
        count = int(ties.sum())
        if count > self._ties_left:
            if self._ties_left > 0:
                ties[int(ties.nonzero()[self._ties_left - 1]) + 1 :] = False
            else:
                ties.zero_()
            count = self._ties_left
        self._ties_left -= count
        return keep | ties
