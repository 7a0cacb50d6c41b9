"""Sign consensus (TIES "elect" and "disjoint merge"), shared by ties, dare_ties, della,
breadcrumbs_ties and sce.

Yadav et al. 2023, "TIES-Merging: Resolving interference when merging models"
(https://arxiv.org/abs/2306.01708), steps 2 and 3:

    γ = sgn(Σᵢ τᵢ)                          (elect: the sign of the larger total mass)
    τ = Σᵢ [sgn τᵢ = γ] τᵢ                  (only the entries that agree with γ)

An entry with Σᵢ τᵢ = 0 elects +1; an entry τᵢ = 0 never agrees (sgn 0 ≠ ±1).
"""

from __future__ import annotations

import torch


def elect_sign(deltas: list[torch.Tensor]) -> torch.Tensor:
    """γ = +1 where Σᵢ τᵢ ≥ 0, else −1 (mergekit's "sum" consensus), float32."""
    total = _sum(deltas)
    return torch.where(total >= 0, 1.0, -1.0)


def agrees(delta: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """[sgn τ = γ]: True where a delta has the elected sign (never where τ = 0)."""
    return torch.sign(delta) == sign


def disjoint_sum(deltas: list[torch.Tensor], weights: list[float] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σᵢ [sgn τᵢ = γ] τᵢ, Σᵢ [sgn τᵢ = γ] wᵢ) with γ elected from the τᵢ themselves.

    The second sum is the divisor of TIES's disjoint *mean*: the total weight of the
    models that agree at each entry (mergekit replaces an exact 0 by 1, see
    ``disjoint_mean_divisor``).
    """
    sign = elect_sign(deltas)
    mixed = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        agree = agrees(delta, sign)
        mixed += torch.where(agree, delta, 0.0)
        divisor += agree * weight
    return mixed, divisor


def disjoint_mean_divisor(divisor: torch.Tensor) -> torch.Tensor:
    """The divisor with exact zeros (no model agrees) replaced by 1, in place."""
    return divisor.masked_fill_(divisor == 0, 1.0)


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ in list order (for up to four inputs the same rounding as a stacked sum)."""
    total = tensors[0].clone()
    for x in tensors[1:]:
        total += x
    return total
