"""Task Singular Vectors (TSV-Merge): each task's top singular vectors, made orthogonal.

Shared by the subspace methods (``iso``, ``wudi``): task vectors, the mean of task vectors for
tensors that are not matrices, the orthogonal factor of a matrix, their working memory and the
operation counts of their compute estimates.
"""

from __future__ import annotations

import functools

import torch

from distmerge import threads
from distmerge.methods import Method, Param, elementwise_flops, in_unit_interval


def one_cpu_thread(merge):
    """Run ``merge`` on one intra-op thread (``distmerge.threads.one``) when its base is on
    the CPU, also when it is called outside a run (a rank already merges on one).

    LAPACK's SVD and BLAS's products block their work by thread count, so their float32 bits
    depend on it (measured: 1e-5 apart between 1 and 2 threads on a 384×512 matrix). On a
    GPU (cuSOLVER, cuBLAS) the thread count plays no part."""

    @functools.wraps(merge)
    def wrapped(base, tensors, **kwargs):
        if base.device.type != "cpu":
            return merge(base, tensors, **kwargs)
        with threads.one():
            return merge(base, tensors, **kwargs)

    return wrapped


def task_vectors(base: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """τᵢ = θᵢ − θ₀, in float32."""
    base = base.float()
    return [x.float() - base for x in tensors]


def mean_update(deltas: list[torch.Tensor]) -> torch.Tensor:
    """(1/T) Σᵢ τᵢ: what the subspace papers do with tensors that are not matrices (biases,
    norms), summed in input order."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    return total / len(deltas)


def orthogonalize(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor U Vᵀ of a = U S Vᵀ (the nearest matrix with orthonormal columns or
    rows: TSV's "whitening" of the concatenated singular vectors)."""
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def svd_bytes(n_inputs: int, numel: int) -> int:
    """Working memory of one of the SVD merges of an m×n matrix: a float32 copy of every input,
    each task's thin SVD (U, Vᵀ: at most 2·numel with k = min(m, n) ≤ √numel singular values), the
    concatenated factors and their own SVDs (about 4·numel), and LAPACK's workspace (about
    numel): float32_copies plus 7 tensor-sized buffers."""
    return numel * 4 * (n_inputs + 2 + 7)


def svd_flops(m: int, n: int) -> int:
    """Operations of the thin SVD of an m×n matrix, counted as matrix products' operations: twice
    Golub & Van Loan's R-SVD count 6·M·K² + 11·K³ (M = max(m, n), K = min(m, n)), because LAPACK's
    SVD runs at about half the rate of a product (measured on one thread: a 2048×2048 float32 SVD
    in 4.1 s, 36 G of its nominal operations a second; a product of two such matrices in 0.24 s,
    72 G a second). With this count one rate (``distmerge.plan.CPU_FLOPS_PER_S``) times both."""
    big, k = max(m, n), min(m, n)
    return 2 * (6 * big * k * k + 11 * k**3)


def matmul_flops(m: int, k: int, n: int) -> int:
    """Operations of an (m×k)·(k×n) product."""
    return 2 * m * k * n


def orthogonalize_flops(m: int, n: int) -> int:
    """Operations of ``orthogonalize`` of an m×n matrix: its SVD and the product U Vᵀ."""
    return svd_flops(m, n) + matmul_flops(m, min(m, n), n)


def tsv_flops(n_inputs: int, shape: list[int], params: dict) -> int:
    """Compute of ``tsv`` on one tensor: for a matrix, one SVD per task vector, the orthogonal
    factors of the concatenated U (m×T·r) and Vᵀ (T·r×n), and the products that join them."""
    if len(shape) != 2:
        return elementwise_flops(n_inputs, shape, params)
    (m, n), tasks = shape, n_inputs - 1
    fraction = params.get("rank_fraction")
    c = tasks * max(1, int(min(m, n) * (fraction if fraction is not None else 1 / tasks)))
    return (
        tasks * svd_flops(m, n) + orthogonalize_flops(m, c) + orthogonalize_flops(c, n)
        + matmul_flops(m, c, c) + matmul_flops(m, c, n) + elementwise_flops(n_inputs, shape, params)
    )


@one_cpu_thread
def tsv(base: torch.Tensor, tensors: list[torch.Tensor], *, rank_fraction: float | None = None, lambda_: float = 1.0) -> torch.Tensor:
    """θ = θ₀ + λ · (U⊥ diag(σ) V⊥ᵀ) for matrices, θ₀ + λ (1/T) Σᵢ τᵢ for other tensors.

    Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging"
    (CVPR, https://arxiv.org/abs/2412.00081), TSV-Merge. For each task vector τᵢ = Uᵢ Sᵢ Vᵢᵀ
    (thin SVD, k = min(m, n)) keep its top r = max(1, ⌊k · rank_fraction⌋) singular triplets
    (rank_fraction = 1/T by default); concatenate them, U = [U₁,ᵣ … U_T,ᵣ], σ = [σ₁,ᵣ … σ_T,ᵣ],
    V = [V₁,ᵣ … V_T,ᵣ], and replace U and V by their orthogonal factors U⊥ = P Qᵀ for U = P Σ Qᵀ
    (and likewise V⊥): the paper's decorrelation of the task subspaces.

    Where distmerge differs from the paper's code: the concatenation holds only the T·r kept
    columns, not k columns padded with zeros (the same result when the kept columns are linearly
    independent, as they generically are; a zero column's direction there is arbitrary and is
    multiplied by σ = 0 anyway), and r is at least 1. λ is the paper's α (1.0 in the paper).
    """
    deltas = task_vectors(base, tensors)
    if base.dim() != 2:
        return base + lambda_ * mean_update(deltas)
    k = min(base.shape)
    r = max(1, int(k * (rank_fraction if rank_fraction is not None else 1 / len(deltas))))
    us, ss, vhs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :r])
        ss.append(s[:r])
        vhs.append(vh[:r])
    u, s, vh = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
    merged = orthogonalize(u) @ torch.diag(s) @ orthogonalize(vh)
    return base + lambda_ * merged


METHODS = (
    Method(
        name="tsv",
        merge=tsv,
        params=(
            Param("rank_fraction", float, None, check=in_unit_interval, doc="fraction of each task vector's singular values kept (default 1/T)"),
            Param("lambda", float, 1.0, doc="scale of the merged task vector (the paper's alpha)"),
        ),
        base="required",
        min_inputs=1,
        work_bytes=svd_bytes,
        work_flops=tsv_flops,
        summary="Task Singular Vectors: each task's top singular vectors, the subspaces made orthogonal (TSV-Merge).",
        paper="https://arxiv.org/abs/2412.00081",
    ),
)
