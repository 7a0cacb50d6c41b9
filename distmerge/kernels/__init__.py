"""Fused element-wise steps of the merge methods: Triton kernels on CUDA, plain torch elsewhere.

Each function here has a plain-torch reference in ``distmerge.kernels.reference`` (the
methods' math, operation for operation), a Triton launcher of the same signature in
``distmerge.kernels.triton_kernels``, and on CPU a fused loop compiled by torch.compile
from the same operations (``distmerge.kernels.compiled``); it runs the kernel when
``use_triton`` says so for its first tensor, the compiled loop for a large CPU tensor, and
the reference otherwise. The kernels compute the same
float32 operations in the same order (see ``triton_kernels`` for what is and is not bitwise).

==================  ============================================================  ==============
function            computes                                                      used by
==================  ============================================================  ==============
linear_sum          Σᵢ wᵢθᵢ (/ Σᵢ wᵢ), FMA-accumulated like ``addcmul_``             linear
task_combine        θ₀ + λ·Σᵢ wᵢτᵢ / D, or TIES: sign election + disjoint mean     (given τᵢ)
task_merge          the same from the models: τᵢ = θᵢ − θ₀, sparsified inside the    task-arithmetic
                    kernel by a ``sparsifiers`` rule (top-k, breadcrumbs band,      family
                    DARE draw, mask) with the L1 rescale's norms in a first pass
dare_drop           DARE drop + L1 rescale of one delta (two passes)                 —
slerp_combine       c₀·a + c₁·b                                                     slerp
scale               s·x with the casts                                              passthrough
stock_interpolate   t·mean(θᵢ) + (1 − t)·θ₀                                          model_stock
==================  ============================================================  ==============

Every function also takes ``work_dtype`` / ``out_dtype`` (see ``reference``), so a kernel
can read inputs in their storage dtype and write the output dtype directly.

``DISTMERGE_NO_TRITON=1`` forces the references everywhere (a debugging switch).
"""

from __future__ import annotations

import functools
import os

import torch

from distmerge.kernels import compiled, reference
from distmerge.kernels.sparsifiers import Masked, Outliers, RandomDrop, TopK

__all__ = [
    "Masked",
    "Outliers",
    "RandomDrop",
    "TopK",
    "dare_drop",
    "linear_sum",
    "scale",
    "slerp_combine",
    "stock_interpolate",
    "task_combine",
    "task_merge",
    "triton_available",
    "use_triton",
]


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works here (checked once per process)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install failing at import time
        return False
    return True


def use_triton(tensor) -> bool:
    """True for a CUDA tensor when triton is importable and DISTMERGE_NO_TRITON is not set."""
    if not getattr(tensor, "is_cuda", False):
        return False
    if os.environ.get("DISTMERGE_NO_TRITON", "0").strip().lower() not in ("", "0", "false", "no"):
        return False
    return triton_available()


_triton_module = None


def _triton():
    """``distmerge.kernels.triton_kernels``, imported on first use (tests swap in an interpreted copy)."""
    global _triton_module
    if _triton_module is None:
        from distmerge.kernels import triton_kernels

        _triton_module = triton_kernels
    return _triton_module


def _impl(tensor, consensus: bool = False):
    if use_triton(tensor):
        return _triton()
    return compiled if compiled.enabled(tensor, consensus) else reference


def linear_sum(
    tensors: list[torch.Tensor], weight: list[float], *, normalize: bool, work_dtype=None, out_dtype=None
) -> torch.Tensor:
    """Σᵢ wᵢθᵢ, divided by Σᵢ wᵢ when ``normalize`` (model soups)."""
    impl = _impl(tensors[0])
    return impl.linear_sum(tensors, weight, normalize=normalize, work_dtype=work_dtype, out_dtype=out_dtype)


def task_combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weight: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    work_dtype=None,
    out_dtype=None,
) -> torch.Tensor:
    """θ₀ + λ·(Σᵢ wᵢτᵢ, or the TIES disjoint sum)/D for given task vectors τᵢ."""
    return _impl(base, consensus).task_combine(
        base, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_,
        work_dtype=work_dtype, out_dtype=out_dtype,
    )  # fmt: skip


def task_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weight: list[float],
    sparsifier=None,
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    work_dtype=None,
    out_dtype=None,
) -> torch.Tensor:
    """θ₀ + λ·combine(sparsifier(i, θᵢ − θ₀)) — the task-arithmetic family from the models."""
    return _impl(base, consensus).task_merge(
        base, tensors, weight, sparsifier, consensus=consensus, normalize=normalize, lambda_=lambda_,
        work_dtype=work_dtype, out_dtype=out_dtype,
    )  # fmt: skip


def dare_drop(
    delta: torch.Tensor, density: float, seed: int, rescale: bool = True, *, offset: int = 0, out_dtype=None
) -> torch.Tensor:
    """δ ⊙ [uniform(seed)[offset + j] < density], L1-rescaled when ``rescale``."""
    return _impl(delta).dare_drop(delta, density, seed, rescale, offset=offset, out_dtype=out_dtype)


def slerp_combine(c0, c1, a: torch.Tensor, b: torch.Tensor, *, work_dtype=None, out_dtype=None) -> torch.Tensor:
    """c₀·a + c₁·b (float32 coefficients computed beforehand)."""
    return _impl(a).slerp_combine(c0, c1, a, b, work_dtype=work_dtype, out_dtype=out_dtype)


def scale(x: torch.Tensor, s: float | None, *, work_dtype=None, out_dtype=None) -> torch.Tensor:
    """s·x, or x when s is None."""
    return _impl(x).scale(x, s, work_dtype=work_dtype, out_dtype=out_dtype)


def stock_interpolate(
    w0: torch.Tensor, models: list[torch.Tensor], t: torch.Tensor, *, work_dtype=None, out_dtype=None
) -> torch.Tensor:
    """t·(Σᵢ θᵢ / N) + (1 − t)·θ₀, t one ratio or one per row."""
    return _impl(w0).stock_interpolate(w0, models, t, work_dtype=work_dtype, out_dtype=out_dtype)
