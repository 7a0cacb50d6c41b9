"""The task-arithmetic family: task vectors, optionally sparsified, optionally sign-elected.

Every member computes, from the base θ₀ and models θ₁..θₙ with weights wᵢ::

    τᵢ = θᵢ − θ₀                                  task vectors
    τᵢ ← sparsify(τᵢ; densityᵢ, …)                trim / drop (distmerge.methods.sparsify)
    τ  = Σᵢ wᵢτᵢ                  (linear)   or    Σᵢ [sgn wᵢτᵢ = γ] wᵢτᵢ   (TIES consensus)
    τ ← τ / D                     if normalize; D = Σᵢ wᵢ, or Σᵢ [sgn wᵢτᵢ = γ] wᵢ
    θ  = θ₀ + λ τ

as mergekit 0.1.5's GeneralizedTaskArithmeticMerge does, with its quirks: the sign is
elected on the *weighted* deltas; the linear divisor is replaced by 1 when |D| < 1e-8,
the consensus divisor only where D = 0 exactly; "rescale" matches the L1 norm of each
sparsified delta to the original's (not DARE's 1/density); and every member accepts
the same parameters (int8_mask, normalize, rescale, lambda, weight, density, plus gamma
or epsilon), even where one has no effect: task_arithmetic ignores density and rescale,
and int8_mask never changes a result (it only picks the dtype of a 0/1 mask).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from distmerge import kernels, rng
from distmerge.methods import Method, Param, chunk_ranges, in_unit_interval, non_negative, sparsify

Sparsifier = Callable[[int, torch.Tensor], torch.Tensor]
"""(input index, delta) -> sparsified delta."""


def task_vectors(base: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """τᵢ = θᵢ − θ_base."""
    return [x - base for x in tensors]


def combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weight: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """θ₀ + λ · (Σᵢ wᵢτᵢ, or its TIES disjoint version) / D — the family's last step.

    Linear: D = Σᵢ wᵢ. Consensus: γ = sgn Σᵢ wᵢτᵢ, Σᵢ [sgn wᵢτᵢ = γ] wᵢτᵢ / Σᵢ [sgn wᵢτᵢ = γ] wᵢ
    (``distmerge.methods.consensus``). One fused kernel on CUDA (``distmerge.kernels``).
    """
    return kernels.task_combine(base, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)


def _merge(base, tensors, weight, sparsify_one: Sparsifier | None, *, consensus, normalize, lambda_):
    """combine(θ₀, [sparsify_one(i, τᵢ)], …) with τᵢ = θᵢ − θ₀.

    On CUDA, for the ``kernels`` sparsifiers (TopK, Outliers, RandomDrop), task vectors,
    sparsification and combination are one kernel pass over the models (``kernels.task_merge``).
    """
    if not tensors:
        return base
    return kernels.task_merge(
        base, tensors, weight, sparsify_one, consensus=consensus, normalize=normalize, lambda_=lambda_
    )


# ---------------------------------------------------------------- the registered methods


def task_arithmetic(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    *,
    weight: list[float],
    density: list[float] | None = None,
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """θ = θ₀ + λ Σᵢ wᵢ τᵢ  (divided by Σᵢ wᵢ when ``normalize``).

    Ilharco et al. 2023, "Editing models with task arithmetic"
    (https://arxiv.org/abs/2212.04089). A negative weight subtracts a task vector.
    density, rescale and int8_mask are accepted and ignored, as in mergekit.
    """
    return _merge(base, tensors, weight, None, consensus=False, normalize=normalize, lambda_=lambda_)


def ties(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    normalize: bool = True,
    rescale: bool = False,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """TIES: trim each τᵢ to its top-⌊densityᵢ·n⌋ |entries|, elect signs, disjoint mean.

    θ = θ₀ + λ Σᵢ [sgn wᵢτ̂ᵢ = γ] wᵢτ̂ᵢ / Σᵢ [sgn wᵢτ̂ᵢ = γ] wᵢ, τ̂ᵢ = trim(τᵢ), γ = sgn Σᵢ wᵢτ̂ᵢ.
    Yadav et al. 2023 (https://arxiv.org/abs/2306.01708).
    """
    trim = kernels.TopK(density, rescale)  # (i, τ) -> sparsify.magnitude(τ, densityᵢ, rescale)
    return _merge(base, tensors, weight, trim, consensus=True, normalize=normalize, lambda_=lambda_)


def dare_ties(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    seeds: list[int],
    normalize: bool = False,
    rescale: bool = True,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """DARE drop (keep each entry with probability densityᵢ, rescale) + TIES consensus.

    Yu et al. 2023, "Language models are Super Mario" (https://arxiv.org/abs/2311.03099).
    """
    drop = kernels.RandomDrop(density, seeds, rescale)  # (i, τ) -> sparsify.random(τ, densityᵢ, seedᵢ, rescale)
    return _merge(base, tensors, weight, drop, consensus=True, normalize=normalize, lambda_=lambda_)


def dare_linear(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    seeds: list[int],
    normalize: bool = False,
    rescale: bool = True,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """DARE drop and rescale, then task arithmetic: θ = θ₀ + λ Σᵢ wᵢ drop(τᵢ).

    Yu et al. 2023 (https://arxiv.org/abs/2311.03099).
    """
    drop = kernels.RandomDrop(density, seeds, rescale)  # (i, τ) -> sparsify.random(τ, densityᵢ, seedᵢ, rescale)
    return _merge(base, tensors, weight, drop, consensus=False, normalize=normalize, lambda_=lambda_)


def breadcrumbs(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    gamma: list[float],
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Model Breadcrumbs: drop the γᵢ largest and the smallest |entries| of each τᵢ, then
    task arithmetic. Davari & Belilovsky 2023 (https://arxiv.org/abs/2312.06795).
    """
    crumbs = kernels.Outliers(density, gamma, rescale)  # (i, τ) -> sparsify.magnitude_outliers(τ, …)
    return _merge(base, tensors, weight, crumbs, consensus=False, normalize=normalize, lambda_=lambda_)


def breadcrumbs_ties(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    gamma: list[float],
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Model Breadcrumbs sparsification with TIES sign consensus.

    Davari & Belilovsky 2023 (https://arxiv.org/abs/2312.06795).
    """
    crumbs = kernels.Outliers(density, gamma, rescale)  # (i, τ) -> sparsify.magnitude_outliers(τ, …)
    return _merge(base, tensors, weight, crumbs, consensus=True, normalize=normalize, lambda_=lambda_)


def della(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    epsilon: list[float],
    seeds: list[int],
    normalize: bool = True,
    rescale: bool = True,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """DELLA: MagPrune (keep probability densityᵢ ± εᵢ by magnitude rank) + TIES consensus.

    Deep et al. 2024, "DELLA-Merging" (https://arxiv.org/abs/2406.11617).
    """
    prune = lambda i, d: sparsify.della_magprune(d, density[i], epsilon[i], seeds[i], rescale)
    return _merge(base, tensors, weight, prune, consensus=True, normalize=normalize, lambda_=lambda_)


def della_linear(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    epsilon: list[float],
    seeds: list[int],
    normalize: bool = False,
    rescale: bool = True,
    int8_mask: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """DELLA's MagPrune, then task arithmetic. Deep et al. 2024 (https://arxiv.org/abs/2406.11617)."""
    prune = lambda i, d: sparsify.della_magprune(d, density[i], epsilon[i], seeds[i], rescale)
    return _merge(base, tensors, weight, prune, consensus=False, normalize=normalize, lambda_=lambda_)


# ---------------------------------------------------------------- two passes over chunks (CPU)


def _chunked(read, numel: int, chunk: int, weight, selections, *, consensus: bool, normalize: bool, lambda_: float):
    """``_merge`` with top-k sparsifiers, for a tensor read in flat chunks: the same bits.

    ``selections[i]`` is None (τᵢ kept whole) or (keep, drop): τ̂ᵢ keeps the entries of
    ``keep``'s top-k |τᵢ| that are not in ``drop``'s (None: none dropped). Pass 1 gathers
    every selection's statistics over all chunks (``sparsify.ChunkedTopK``); pass 2 trims
    each chunk's task vectors with its masks and combines them, all element-wise.
    """
    ranges = chunk_ranges(numel, chunk)
    live = [[top for top in pair or () if top is not None and not top.trivial] for pair in selections]
    if any(live):
        for low in (False, True):
            for start, end in ranges:
                base, tensors = read(start, end)
                for tops, x in zip(live, tensors):
                    if tops:
                        sparsify.ChunkedTopK.gather(tops, x - base, low=low)
        for tops in live:
            for top in tops:
                top.finish()
    for start, end in ranges:
        base, tensors = read(start, end)
        deltas = task_vectors(base, tensors)
        trimmed = [delta if pair is None else pair[0].trim(delta, pair[1]) for pair, delta in zip(selections, deltas)]
        yield start, end, combine(base, trimmed, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)


def _top_k(numel: int, density: float) -> tuple | None:
    """``sparsify.magnitude``'s selection: None for density ≥ 1, else the top k = max(1, ⌊density·n⌋)."""
    if density >= 1:
        return None
    return sparsify.ChunkedTopK(numel, max(1, int(density * numel)) if density > 0 else 0), None


def _band(numel: int, density: float, gamma: float) -> tuple | None:
    """``sparsify.magnitude_outliers``'s selection: the top ⌊γ·n⌋ + ⌊density·n⌋ minus the top ⌊γ·n⌋."""
    if density >= 1:
        return None
    target = max(0, int(density * numel))
    dropped_top = numel - max(0, numel - target - int(gamma * numel)) - target
    return sparsify.ChunkedTopK(numel, dropped_top + target), sparsify.ChunkedTopK(numel, dropped_top)


def ties_chunked(read, shape, chunk, *, weight, density, normalize=True, rescale=False, int8_mask=False, lambda_=1.0):
    """``ties`` in two passes over chunks (None with ``rescale``: its L1 norms need whole tensors)."""
    if not density or (rescale and min(density) < 1):
        return None
    numel = math.prod(shape)
    selections = [_top_k(numel, d) for d in density]
    return _chunked(read, numel, chunk, weight, selections, consensus=True, normalize=normalize, lambda_=lambda_)


def _breadcrumbs_chunked(consensus: bool):
    """``breadcrumbs`` (or ``breadcrumbs_ties``) in two passes over chunks (None with ``rescale``)."""

    def chunked(read, shape, chunk, *, weight, density, gamma, normalize=False, rescale=False, lambda_=1.0, **_):
        if not density or (rescale and min(density) < 1):
            return None
        numel = math.prod(shape)
        selections = [_band(numel, d, g) for d, g in zip(density, gamma)]
        return _chunked(
            read, numel, chunk, weight, selections, consensus=consensus, normalize=normalize, lambda_=lambda_
        )

    return chunked


# ---------------------------------------------------------------- parameters and registry


def _params(normalize: bool, rescale: bool, density_check=in_unit_interval, extra: tuple[Param, ...] = ()):
    """The parameter set every mergekit task-arithmetic method takes, with its defaults."""
    return (
        Param("weight", float, scope="input", doc="weight of each task vector (negative to subtract it)"),
        Param("density", float, 1.0, scope="input", check=density_check, doc="fraction of each task vector kept"),
        Param("normalize", bool, normalize, doc="divide the merged task vector by the (agreeing) weights' sum"),
        Param("rescale", bool, rescale, doc="scale kept entries so each task vector keeps its L1 norm"),
        Param("int8_mask", bool, False, doc="accepted for mergekit compatibility; no effect on the result"),
        Param("lambda", float, 1.0, doc="scale of the merged task vector"),
    ) + extra


_GAMMA = Param("gamma", float, 0.01, scope="input", check=non_negative, doc="fraction of largest-magnitude entries dropped")
_EPSILON = Param(
    "epsilon", float, 0.15, scope="input", check=non_negative, doc="keep probabilities span density ± epsilon by rank"
)


def _dropped_chunked(read, ranges, numel, draws, weight, *, rescale, consensus, normalize, lambda_):
    """``_merge`` with random-drop sparsifiers (DARE, DELLA), for a tensor read in chunks: the same bits.

    ``draws[i]`` is None (τᵢ kept whole) or ``keep(start, end, τ)``: the keep mask of the
    chunk [start, end) of τᵢ (a draw depends only on element indices, so a mask does not
    depend on chunking). Per model, pass 1 draws the masks chunk by chunk and, with
    ``rescale``, gathers |τᵢ ⊙ mᵢ| into one float32 buffer; pass 2 gathers |τᵢ| into the same
    buffer. Their sums are ``sparsify.masked``'s whole-tensor L1 norms (same values, same
    reduction). The last pass drops, rescales and combines chunk by chunk. Memory: one keep
    mask per model and one float32 buffer, however many models.
    """
    buffer = torch.empty(numel) if rescale and any(d is not None for d in draws) else None
    drops = []  # per model: None (τᵢ kept whole) or (keep mask, rescale factor or None)
    for i, draw in enumerate(draws):
        if draw is None:
            drops.append(None)
            continue
        keep = torch.empty(numel, dtype=torch.bool)
        for start, end in ranges:
            base, tensors = read(start, end)
            delta = tensors[i] - base
            keep[start:end] = draw(start, end, delta)
            if rescale:
                torch.abs(torch.where(keep[start:end], delta, 0.0), out=buffer[start:end])
        factor = None
        if rescale:
            after = buffer.sum()
            for start, end in ranges:
                base, tensors = read(start, end)
                torch.abs(tensors[i] - base, out=buffer[start:end])
            before = buffer.sum()
            if before >= sparsify.RESCALE_EPS and after >= sparsify.RESCALE_EPS:
                factor = before / after
        drops.append((keep, factor))
    del buffer
    for start, end in ranges:
        base, tensors = read(start, end)
        deltas = []
        for drop, delta in zip(drops, task_vectors(base, tensors)):
            if drop is not None:
                keep, factor = drop
                delta = torch.where(keep[start:end], delta, 0.0)
                if factor is not None:
                    delta = delta * factor
            deltas.append(delta)
        yield start, end, combine(base, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)


def _dare_chunked(consensus: bool):
    """``dare_ties`` (or ``dare_linear``) for a tensor read in flat chunks (``_dropped_chunked``):
    element i of τᵢ keeps when ``rng.uniform(seedᵢ)[i] < densityᵢ``."""

    def chunked(read, shape, chunk, *, weight, density, seeds, normalize=False, rescale=True, lambda_=1.0, **_):
        numel = math.prod(shape)

        def drop(i: int):
            if density[i] >= 1:
                return None
            return lambda start, end, delta: rng.bernoulli_keep(seeds[i], (end - start,), density[i], offset=start)

        draws = [drop(i) for i in range(len(density))]
        return _dropped_chunked(
            read, chunk_ranges(numel, chunk), numel, draws, weight,
            rescale=rescale, consensus=consensus, normalize=normalize, lambda_=lambda_,
        )  # fmt: skip

    return chunked


def _della_chunked(consensus: bool):
    """``della`` (or ``della_linear``) for a 2-D tensor read in whole rows (``_dropped_chunked``):
    MagPrune's keep probabilities rank |τ| within each row, so each chunk is a block of rows.
    None for other ranks: a 1-D tensor is one row (small), and higher ranks rank along axis 1."""

    def chunked(read, shape, chunk, *, weight, density, epsilon, seeds, normalize=True, rescale=True, lambda_=1.0, **_):
        if len(shape) != 2:
            return None
        rows, columns = shape
        block = max(1, chunk // columns) * columns
        numel = rows * columns

        def drop(i: int):
            d, eps = density[i], epsilon[i]
            if d >= 1:
                return None
            if d > 0:
                sparsify.check_della(d, eps)

            def keep(start: int, end: int, delta: torch.Tensor) -> torch.Tensor:
                if d <= 0:
                    return torch.zeros(end - start, dtype=torch.bool)
                probs = sparsify.della_probabilities(delta.view(-1, columns), d, eps)
                return rng.bernoulli_keep(seeds[i], probs.shape, probs, offset=start).view(-1)

            return keep

        draws = [drop(i) for i in range(len(density))]
        return _dropped_chunked(
            read, chunk_ranges(numel, block), numel, draws, weight,
            rescale=rescale, consensus=consensus, normalize=normalize, lambda_=lambda_,
        )  # fmt: skip

    return chunked


def _method(name, merge, params, summary, paper, randomized=False, elementwise=False, chunked=None):
    return Method(
        name=name,
        merge=merge,
        chunked=chunked,
        params=params,
        base="required",
        min_inputs=0,
        randomized=randomized,
        elementwise=elementwise,
        summary=summary,
        paper=paper,
    )


METHODS = (
    _method(
        "task_arithmetic",
        task_arithmetic,
        _params(False, False, density_check=None),
        "Base plus the weighted sum of task vectors; negative weights negate.",
        "https://arxiv.org/abs/2212.04089",
        elementwise=True,
    ),
    _method(
        "ties",
        ties,
        _params(True, False),
        "Trim task vectors by magnitude, elect signs, average the agreeing entries.",
        "https://arxiv.org/abs/2306.01708",
        chunked=ties_chunked,
    ),
    _method(
        "dare_ties",
        dare_ties,
        _params(False, True),
        "Randomly drop task-vector entries and rescale, then TIES sign consensus.",
        "https://arxiv.org/abs/2311.03099",
        randomized=True,
        chunked=_dare_chunked(consensus=True),
    ),
    _method(
        "dare_linear",
        dare_linear,
        _params(False, True),
        "Randomly drop task-vector entries and rescale, then add them up.",
        "https://arxiv.org/abs/2311.03099",
        randomized=True,
        chunked=_dare_chunked(consensus=False),
    ),
    _method(
        "breadcrumbs",
        breadcrumbs,
        _params(False, False, extra=(_GAMMA,)),
        "Drop the smallest and the largest task-vector entries, then add them up.",
        "https://arxiv.org/abs/2312.06795",
        chunked=_breadcrumbs_chunked(consensus=False),
    ),
    _method(
        "breadcrumbs_ties",
        breadcrumbs_ties,
        _params(False, False, extra=(_GAMMA,)),
        "Breadcrumbs sparsification with TIES sign consensus.",
        "https://arxiv.org/abs/2312.06795",
        chunked=_breadcrumbs_chunked(consensus=True),
    ),
    _method(
        "della",
        della,
        _params(True, True, extra=(_EPSILON,)),
        "Drop task-vector entries with magnitude-ranked probabilities, then TIES consensus.",
        "https://arxiv.org/abs/2406.11617",
        randomized=True,
        chunked=_della_chunked(consensus=True),
    ),
    _method(
        "della_linear",
        della_linear,
        _params(False, True, extra=(_EPSILON,)),
        "Drop task-vector entries with magnitude-ranked probabilities, then add them up.",
        "https://arxiv.org/abs/2406.11617",
        randomized=True,
        chunked=_della_chunked(consensus=False),
    ),
)
