"""Arcee Fusion: take the other model's value only where it matters most.

Importance of an entry is |θ₁ − θ₀| times the KL divergence between the softmaxes of
the two models' rows; only entries above an outlier threshold (median + 1.5 IQR of the
importances) take the other model's value. https://arcee.ai
"""

from __future__ import annotations

import torch

from distmerge import rng
from distmerge.methods import Method

QUANTILE_SAMPLE_SIZE = 1_000_000
"""Above this many entries the quartiles are estimated from this many draws."""


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ₁ − θ₀| · KL(p ‖ q), p = softmax(θ₁) + 1e-8, q = softmax(θ₀) + 1e-8 over the last axis."""
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (other - base).abs() * kl


def outlier_threshold(scores: torch.Tensor, seed: int) -> torch.Tensor:
    """Q₂ + 1.5 (Q₃ − Q₁), with Qₖ the sorted value at index ⌊k/4 · (m − 1)⌋.

    Over all m entries, or when there are more than ``QUANTILE_SAMPLE_SIZE`` of them,
    over that many drawn uniformly with replacement (``rng.sample_indices(seed)``;
    mergekit draws these from torch's global generator).
    """
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        flat = flat[rng.sample_indices(seed, QUANTILE_SAMPLE_SIZE, flat.numel(), device=flat.device)]
    ordered = torch.sort(flat).values
    q1, q2, q3 = (ordered[int(q * (ordered.numel() - 1))] for q in (0.25, 0.5, 0.75))
    return q2 + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, tensors: list[torch.Tensor], *, seeds: list[int]) -> torch.Tensor:
    """θ = θ₀ + [s ≥ T] (θ₁ − θ₀), s = ``importance``, T = ``outlier_threshold(s)``."""
    (other,) = tensors
    scores = importance(other, base)
    take = scores >= outlier_threshold(scores, seeds[0])
    return base + torch.where(take, other - base, 0.0)


METHODS = (
    Method(
        name="arcee_fusion",
        merge=arcee_fusion,
        params=(),
        base="required",
        min_inputs=1,
        max_inputs=1,
        randomized=True,
        summary="Take the other model's entries whose importance is an outlier (KL-weighted change).",
        paper="https://arcee.ai",
    ),
)
