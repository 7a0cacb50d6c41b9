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

from typing import Callable

import torch

from distmerge import kernels
from distmerge.methods import Method, Param, in_unit_interval, non_negative, sparsify

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


def _method(name, merge, params, summary, paper, randomized=False, elementwise=False):
    return Method(
        name=name,
        merge=merge,
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
    ),
    _method(
        "dare_ties",
        dare_ties,
        _params(False, True),
        "Randomly drop task-vector entries and rescale, then TIES sign consensus.",
        "https://arxiv.org/abs/2311.03099",
        randomized=True,
    ),
    _method(
        "dare_linear",
        dare_linear,
        _params(False, True),
        "Randomly drop task-vector entries and rescale, then add them up.",
        "https://arxiv.org/abs/2311.03099",
        randomized=True,
    ),
    _method(
        "breadcrumbs",
        breadcrumbs,
        _params(False, False, extra=(_GAMMA,)),
        "Drop the smallest and the largest task-vector entries, then add them up.",
        "https://arxiv.org/abs/2312.06795",
    ),
    _method(
        "breadcrumbs_ties",
        breadcrumbs_ties,
        _params(False, False, extra=(_GAMMA,)),
        "Breadcrumbs sparsification with TIES sign consensus.",
        "https://arxiv.org/abs/2312.06795",
    ),
    _method(
        "della",
        della,
        _params(True, True, extra=(_EPSILON,)),
        "Drop task-vector entries with magnitude-ranked probabilities, then TIES consensus.",
        "https://arxiv.org/abs/2406.11617",
        randomized=True,
    ),
    _method(
        "della_linear",
        della_linear,
        _params(False, True, extra=(_EPSILON,)),
        "Drop task-vector entries with magnitude-ranked probabilities, then add them up.",
        "https://arxiv.org/abs/2406.11617",
        randomized=True,
    ),
)
