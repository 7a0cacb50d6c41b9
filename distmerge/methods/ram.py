"""RAM: Reinforced Agent Merging — average task vectors only where they overlap.

Task vectors τᵢ = θᵢ − θ₀ count as present at an entry where |τᵢ| > ε. With cⱼ the
number of models present at entry j, an entry touched by one model takes that model's
value unchanged, and one touched by several takes their mean (not diluted by the models
that left it alone). https://arxiv.org/abs/2601.13572
"""

from __future__ import annotations

import torch

from distmerge.methods import Method, Param, non_negative


def _presence(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float):
    """(τᵢ zeroed where |τᵢ| ≤ ε, presence masks, cⱼ = Σᵢ presence)."""
    deltas = [x - base for x in tensors]
    present = [d.abs() > epsilon for d in deltas]
    counts = torch.zeros_like(base, dtype=torch.int32)
    for p in present:
        counts += p
    return [torch.where(p, d, 0.0) for d, p in zip(deltas, present)], present, counts


def _merged(deltas, counts, unique_scale=None) -> torch.Tensor:
    """Σᵢ ([cⱼ = 1] sᵢ τᵢⱼ + [cⱼ > 1] τᵢⱼ / cⱼ), sᵢ = 1 unless ``unique_scale`` gives it."""
    unique, shared = counts == 1, counts > 1
    divisor = counts.clamp(min=1)
    total = torch.zeros_like(deltas[0])
    for i, d in enumerate(deltas):
        scale = 1 if unique_scale is None else unique_scale[i]
        total += d * unique * scale + d * shared / divisor
    return total


def ram(base: torch.Tensor, tensors: list[torch.Tensor], *, epsilon: float = 1e-5) -> torch.Tensor:
    """θ₀ + Σᵢ ([cⱼ = 1] τᵢⱼ + [cⱼ > 1] τᵢⱼ / cⱼ): disjoint entries kept, overlaps averaged."""
    if not tensors:
        return base
    deltas, _, counts = _presence(base, tensors, epsilon)
    return base + _merged(deltas, counts)


def ramplus_tl(
    base: torch.Tensor, tensors: list[torch.Tensor], *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> torch.Tensor:
    """RAM+ (tensor-local): a model's unique entries are boosted by λᵢ = 1 + r·clamp(ρᵢ, 0, α),

    ρᵢ = (#entries model i shares with others) / max(#entries only model i touches, ε),
    counted within this tensor; overlaps are averaged as in ``ram``.
    """
    if not tensors:
        return base
    deltas, present, counts = _presence(base, tensors, epsilon)
    unique, shared = counts == 1, counts > 1
    boosts = []
    for p in present:
        n_shared = (p & shared).sum()
        n_unique = (p & unique).sum()
        rho = n_shared / n_unique.clamp(min=epsilon)
        boosts.append(1 + r * rho.clamp(min=0, max=alpha))
    return base + _merged(deltas, counts, boosts)


_EPSILON = Param("epsilon", float, 1e-5, check=non_negative, doc="|task vector| above this counts as a change")

METHODS = (
    Method(
        name="ram",
        merge=ram,
        params=(_EPSILON,),
        base="required",
        min_inputs=0,
        summary="Keep entries only one model changed; average entries several models changed.",
        paper="https://arxiv.org/abs/2601.13572",
    ),
    Method(
        name="ramplus_tl",
        merge=ramplus_tl,
        params=(
            Param("r", float, 0.1, doc="strength of the boost of a model's unique entries"),
            Param("alpha", float, 0.2, check=non_negative, doc="cap of the overlap ratio in the boost"),
            _EPSILON,
        ),
        base="required",
        min_inputs=0,
        summary="RAM with each model's unique entries boosted by its overlap ratio (per tensor).",
        paper="https://arxiv.org/abs/2601.13572",
    ),
)
