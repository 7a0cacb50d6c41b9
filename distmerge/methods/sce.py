"""SCE: Select (high-variance entries), Calculate (per-model weights), Erase (minority signs)."""

from __future__ import annotations

import torch

from distmerge.methods import Method, Param, in_unit_interval
from distmerge.methods.consensus import agrees, elect_sign
from distmerge.methods.sparsify import top_k_mask


def select_by_variance(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Mask of the k = ⌊fraction · #{j : Var_j > 0}⌋ entries whose variance across the
    models is largest (population variance; ties to the lower flat index)."""
    if fraction <= 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    if fraction >= 1:
        return torch.ones_like(deltas[0], dtype=torch.bool)
    var = torch.var(torch.stack(deltas), dim=0, unbiased=False)
    # count (int64) × float is a float32 product in torch, as in mergekit: same k.
    k = int(torch.count_nonzero(var) * fraction)
    return top_k_mask(var, k)


def task_vector_weights(deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """ηᵢ = mean(τᵢ²) / Σₖ mean(τₖ²); equal weights 1/n when that sum is below 1e-6."""
    energies = torch.stack([d.square().mean() for d in deltas])
    total = energies.sum().item()
    if abs(total) < 1e-6:
        return list(torch.ones_like(energies) / len(deltas))
    return list(energies / total)


def sce(
    base: torch.Tensor, tensors: list[torch.Tensor], *, int8_mask: bool = False, select_topk: float = 1.0
) -> torch.Tensor:
    """θ = θ₀ + Σᵢ ηᵢ mᵢ τ̂ᵢ / max(Σᵢ ηᵢ mᵢ, 1e-6), elementwise, where

    τ̂ᵢ = τᵢ on the ``select_topk`` fraction of highest-variance entries (0 elsewhere),
    ηᵢ = ``task_vector_weights``, mᵢ = [sgn τ̂ᵢ = sgn Σₖ τ̂ₖ] (TIES sign election, unweighted).
    Wan et al. 2024, "FuseChat" (https://arxiv.org/abs/2408.07990). int8_mask is accepted
    for mergekit compatibility and has no effect.
    """
    if not tensors:
        return base
    deltas = [x - base for x in tensors]
    if select_topk < 1:
        keep = select_by_variance(deltas, select_topk)
        deltas = [torch.where(keep, d, 0.0) for d in deltas]
    sign = elect_sign(deltas)
    merged = torch.zeros_like(base)
    total = torch.zeros_like(base)
    for d, eta in zip(deltas, task_vector_weights(deltas)):
        erased = agrees(d, sign) * eta
        merged += d * erased
        total += erased
    return base + merged / total.clamp(min=1e-6)


METHODS = (
    Method(
        name="sce",
        merge=sce,
        params=(
            Param("int8_mask", bool, False, doc="accepted for mergekit compatibility; no effect on the result"),
            Param("select_topk", float, 1.0, check=in_unit_interval, doc="fraction of highest-variance entries kept"),
        ),
        base="required",
        min_inputs=0,
        summary="Keep high-variance entries, weight task vectors by their energy, erase minority signs.",
        paper="https://arxiv.org/abs/2408.07990",
    ),
)
