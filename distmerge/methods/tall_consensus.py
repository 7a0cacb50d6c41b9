"""Consensus merging: keep the parameters that at least k tasks' TALL masks call important."""

from __future__ import annotations

import torch

from distmerge.methods import Method, Param, non_negative


def tall_consensus(
    base: torch.Tensor, tensors: list[torch.Tensor], *, mask_lambda: list[float], k: int = 2, lambda_: float = 1.0
) -> torch.Tensor:
    """θ = θ₀ + λ · [Σₜ mₜ ≥ k] ⊙ τ_MTL, with τ_MTL = Σₜ τₜ and the TALL mask of task t

        mₜ = [ |τₜ| ≥ λₜ · |τ_MTL − τₜ| ]       (element-wise; λₜ = ``mask_lambda``)

    Wang et al. 2024, "Localizing Task Information for Improved Model Merging and Compression"
    (ICML, https://arxiv.org/abs/2405.07813), Consensus Task Arithmetic: an element is kept where
    at least k tasks hold it important (k = 2 in the paper; k = 1 keeps the union of the masks,
    k = T their intersection, k > T nothing: the base), and what is kept is the task-arithmetic
    sum τ_MTL. The paper tunes λₜ per task in [0.2, 0.6] on validation data; 0.4 here, the
    middle of that range. λ is the task-arithmetic scale (tuned in the paper; 1.0 here). Every
    tensor, of any shape, the same way.
    Element-wise: inputs may arrive in their stored dtype; the math is in float32.
    """
    base = base.to(torch.float32)
    deltas = [x.to(torch.float32) - base for x in tensors]
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    votes = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for d, lam in zip(deltas, mask_lambda):
        votes += d.abs() >= lam * (total - d).abs()
    return base + lambda_ * torch.where(votes >= k, total, 0.0)


def _k(value: int) -> str | None:
    return None if value >= 1 else f"must be >= 1 (the number of tasks that must agree), got {value}"


METHODS = (
    Method(
        name="tall_consensus",
        merge=tall_consensus,
        params=(
            Param("mask_lambda", float, 0.4, scope="input", check=non_negative, doc="TALL mask threshold λₜ of each task"),
            Param("k", int, 2, check=_k, doc="keep an element where at least k tasks' masks keep it"),
            Param("lambda", float, 1.0, doc="scale of the merged task vector"),
        ),
        base="required",
        elementwise=True,
        work_bytes=lambda n_inputs, numel: numel * 4 * (2 * n_inputs + 3),
        summary="Consensus merging: the task-arithmetic sum where at least k tasks' TALL masks keep an element.",
        paper="https://arxiv.org/abs/2405.07813",
    ),
)
