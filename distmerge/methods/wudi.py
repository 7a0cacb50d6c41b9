"""WUDI-Merging: the merged task vector that least disturbs each task's own inputs."""

from __future__ import annotations

import torch

from distmerge.methods import Method, Param, elementwise_flops
from distmerge.methods.tsv import matmul_flops, mean_update, one_cpu_thread, task_vectors


@one_cpu_thread
def wudi(
    base: torch.Tensor, tensors: list[torch.Tensor], *, steps: int = 300, lr: float = 1e-5, lambda_: float = 1.0
) -> torch.Tensor:
    """θ = θ₀ + λ τ* for matrices, θ₀ + λ (1/T) Σᵢ τᵢ for other tensors, where

        τ* = argmin_τ Σᵢ ‖(τ − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F

    Cheng et al. 2025, "Whoever Started the Interference Should End It: Guiding Data-Free Model
    Merging via Task Vectors" (ICML, https://arxiv.org/abs/2503.08099): the rows of τᵢ span the
    inputs task i's layer sees, so the merged τ should act like τᵢ on them. As in the paper's
    code: τ starts at Σᵢ τᵢ and takes ``steps`` steps of Adam (``adam``, torch.optim.Adam's update) (β = (0.9, 0.999), ε = 1e-8, no
    weight decay) at learning rate ``lr`` (300 steps at 1e-5 there), and λ = 1.

    The gradient is the closed form 2 (τ S − C), S = Σᵢ τᵢᵀτᵢ / ‖τᵢ‖², C = Σᵢ τᵢτᵢᵀτᵢ / ‖τᵢ‖²,
    computed once: one (m×n)·(n×n) product per step instead of autograd through T products
    (the same gradient up to float32 rounding). A task vector that is all zeros adds nothing to
    the loss (the paper's code divides 0 by 0 there). Deterministic: no random numbers, and the
    same operations in the same order wherever it runs on the same kind of device.
    """
    deltas = task_vectors(base, tensors)
    if base.dim() != 2:
        return base + lambda_ * mean_update(deltas)
    gram = torch.zeros(base.shape[1], base.shape[1], dtype=torch.float32, device=base.device)
    target = torch.zeros_like(deltas[0])
    for d in deltas:
        norm2 = torch.sum(d * d)
        if norm2 == 0:
            continue
        g = (d.T @ d) / norm2
        gram += g
        target += d @ g
    tau = deltas[0].clone()
    for d in deltas[1:]:
        tau += d
    return base + lambda_ * adam(tau, lambda x: 2 * (x @ gram - target), steps, lr)


def adam(x: torch.Tensor, grad, steps: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> torch.Tensor:
    """``steps`` steps of Adam (Kingma & Ba 2015) from ``x`` (updated in place and returned),
    written as torch.optim.Adam computes them: m ← β₁m + (1 − β₁)g, v ← β₂v + (1 − β₂)g²,
    x ← x − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)."""
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    for t in range(1, steps + 1):
        g = grad(x)
        m.lerp_(g, 1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        denom = (v.sqrt() / (1 - betas[1] ** t) ** 0.5).add_(eps)
        x.addcdiv_(m, denom, value=-lr / (1 - betas[0] ** t))
    return x


def wudi_bytes(n_inputs: int, numel: int) -> int:
    """float32 copies of the inputs and of τ, its gradient, Adam's two moments and C (5·numel),
    and the n×n matrix S, at most 4·numel for an m×n matrix with n ≤ 4m (every projection of a
    transformer with an MLP ratio up to 4; a wider one needs n/m·numel)."""
    return numel * 4 * (n_inputs + 2 + 5 + 4)


def wudi_flops(n_inputs: int, shape: list[int], params: dict) -> int:
    """Compute of ``wudi`` on one tensor: for an m×n matrix, S and C (two products per task),
    then per Adam step the gradient's product τ S and about ten element-wise operations."""
    if len(shape) != 2:
        return elementwise_flops(n_inputs, shape, params)
    (m, n), tasks, steps = shape, n_inputs - 1, params.get("steps", 300)
    return (
        tasks * (matmul_flops(n, m, n) + matmul_flops(m, n, n))
        + steps * (matmul_flops(m, n, n) + 10 * m * n) + elementwise_flops(n_inputs, shape, params)
    )


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def _steps(value: int) -> str | None:
    return None if value >= 0 else f"must be >= 0 (the number of Adam steps), got {value}"


METHODS = (
    Method(
        name="wudi",
        merge=wudi,
        params=(
            Param("steps", int, 300, check=_steps, doc="Adam steps from the sum of the task vectors"),
            Param("lr", float, 1e-5, check=_positive, doc="Adam's learning rate"),
            Param("lambda", float, 1.0, doc="scale of the merged task vector"),
        ),
        base="required",
        work_bytes=wudi_bytes,
        work_flops=wudi_flops,
        summary="WUDI: the task vector that least changes each task's output on the inputs its own task vector spans (data-free).",
        paper="https://arxiv.org/abs/2503.08099",
    ),
)
