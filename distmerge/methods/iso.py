"""Isotropic merging (Iso-C, Iso-CTS): the spectrum of the summed task vectors made flat."""

from __future__ import annotations

import torch

from distmerge.methods import Method, Param, elementwise_flops
from distmerge.methods.tsv import (
    matmul_flops,
    mean_update,
    one_cpu_thread,
    orthogonalize,
    orthogonalize_flops,
    svd_bytes,
    svd_flops,
    task_vectors,
)


def _sum(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Σᵢ τᵢ, in input order."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    return total


@one_cpu_thread
def iso_c(base: torch.Tensor, tensors: list[torch.Tensor], *, lambda_: float = 1.0) -> torch.Tensor:
    """θ = θ₀ + λ · σ̄ U Vᵀ, where Σᵢ τᵢ = U diag(σ) Vᵀ and σ̄ = mean(σ), for matrices;
    θ₀ + λ (1/T) Σᵢ τᵢ for other tensors.

    Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces" (https://arxiv.org/abs/2502.04959), Iso-C: the task-arithmetic sum
    with every singular value replaced by their mean over all k = min(m, n) of them (the paper's
    code averages all k, zeros included). λ is the paper's α (tuned there; 1.0 here).
    """
    deltas = task_vectors(base, tensors)
    if base.dim() != 2:
        return base + lambda_ * mean_update(deltas)
    u, s, vh = torch.linalg.svd(_sum(deltas), full_matrices=False)
    return base + lambda_ * (s.mean() * (u @ vh))


@one_cpu_thread
def iso_cts(
    base: torch.Tensor, tensors: list[torch.Tensor], *, common_fraction: float = 0.8, lambda_: float = 1.0
) -> torch.Tensor:
    """θ = θ₀ + λ · σ̄ U⊥ V⊥ᵀ for matrices, θ₀ + λ (1/T) Σᵢ τᵢ for other tensors.

    Marczak et al. 2025 (https://arxiv.org/abs/2502.04959), Iso-CTS. With k = min(m, n),
    T tasks, s = T · round((k − ⌊k · common_fraction⌋) / T) task-specific directions in all and
    c = k − s common ones:
      - common subspace: the top c singular triplets (U_c, σ_c, V_c) of Σᵢ τᵢ;
      - task-specific: for each task, the top s/T triplets of its part outside the common
        subspace, τᵢ − U_c U_cᵀ τᵢ;
      - U = [task-specific Us, U_c], V likewise, σ = [their σs, σ_c]; U⊥, V⊥ their orthogonal
        factors (as in TSV-Merge) and σ̄ = mean(σ): θ = θ₀ + λ σ̄ U⊥ V⊥ᵀ.
    ``round`` is Python's (half to even), as in the paper's code. With s = 0 it is Iso-C.
    """
    deltas = task_vectors(base, tensors)
    if base.dim() != 2:
        return base + lambda_ * mean_update(deltas)
    k, n_tasks = min(base.shape), len(deltas)
    specific = round((k - int(k * common_fraction)) / n_tasks) * n_tasks
    common, per_task = k - specific, specific // n_tasks
    u, s, vh = torch.linalg.svd(_sum(deltas), full_matrices=False)
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    us, ss, vhs = [], [], []
    for d in deltas:
        u_t, s_t, vh_t = torch.linalg.svd(d - u_c @ (u_c.T @ d), full_matrices=False)
        us.append(u_t[:, :per_task])
        ss.append(s_t[:per_task])
        vhs.append(vh_t[:per_task])
    u_all, s_all, vh_all = torch.cat([*us, u_c], dim=1), torch.cat([*ss, s_c]), torch.cat([*vhs, vh_c], dim=0)
    return base + lambda_ * (s_all.mean() * (orthogonalize(u_all) @ orthogonalize(vh_all)))


def iso_c_flops(n_inputs: int, shape: list[int], params: dict) -> int:
    """Compute of ``iso_c`` on one tensor: for a matrix, the SVD of the sum and the product U Vᵀ."""
    if len(shape) != 2:
        return elementwise_flops(n_inputs, shape, params)
    m, n = shape
    return orthogonalize_flops(m, n) + elementwise_flops(n_inputs, shape, params)


def iso_cts_flops(n_inputs: int, shape: list[int], params: dict) -> int:
    """Compute of ``iso_cts`` on one tensor: for a matrix, the SVD of the sum; per task, its part
    outside the common subspace (two products) and that part's SVD; the orthogonal factors of
    the joined U (m×k) and Vᵀ (k×n), and their product."""
    if len(shape) != 2:
        return elementwise_flops(n_inputs, shape, params)
    (m, n), tasks = shape, n_inputs - 1
    k = min(m, n)
    common = k - round((k - int(k * params.get("common_fraction", 0.8))) / tasks) * tasks
    per_task = 2 * matmul_flops(m, common, n) + svd_flops(m, n)
    return (
        svd_flops(m, n) + tasks * per_task + orthogonalize_flops(m, k) + orthogonalize_flops(k, n)
        + matmul_flops(m, k, n) + elementwise_flops(n_inputs, shape, params)
    )


def _common_fraction(value: float) -> str | None:
    return None if 0 <= value <= 1 else f"must be in [0, 1] (the share of the spectrum kept common), got {value}"


LAMBDA = Param("lambda", float, 1.0, doc="scale of the merged task vector (the paper's alpha)")

METHODS = (
    Method(
        name="iso_c",
        merge=iso_c,
        params=(LAMBDA,),
        base="required",
        work_bytes=svd_bytes,
        work_flops=iso_c_flops,
        summary="Iso-C: the sum of the task vectors with its singular values all set to their mean.",
        paper="https://arxiv.org/abs/2502.04959",
    ),
    Method(
        name="iso_cts",
        merge=iso_cts,
        params=(
            Param("common_fraction", float, 0.8, check=_common_fraction, doc="share of the singular directions taken from the common subspace"),
            LAMBDA,
        ),
        base="required",
        work_bytes=svd_bytes,
        work_flops=iso_cts_flops,
        summary="Iso-CTS: Iso-C on the common subspace plus each task's own directions outside it.",
        paper="https://arxiv.org/abs/2502.04959",
    ),
)
