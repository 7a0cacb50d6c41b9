"""SLERP: spherical linear interpolation between the base and one other model."""

from __future__ import annotations

import math

import torch

from distmerge import kernels
from distmerge.methods import Method, Param, chunk_ranges, fraction

DOT_THRESHOLD = 0.9995
"""Above this |cos θ| the two tensors are (anti)parallel and SLERP falls back to LERP."""
EPS = 1e-8


def slerp(base: torch.Tensor, tensors: list[torch.Tensor], *, t: float, options=None) -> torch.Tensor:
    """θ = sin((1−t)Ω)/sin Ω · θ₀ + sin(tΩ)/sin Ω · θ₁, with cos Ω = θ₀·θ₁ / (|θ₀| |θ₁|).

    Shoemake 1985, "Animating rotation with quaternion curves"; the whole tensor is
    one vector. t = 0 gives the base, t = 1 the other model. Nearly parallel tensors
    (|cos Ω| > 0.9995) are interpolated linearly, as in mergekit.
    """
    (other,) = tensors
    c0, c1 = coefficients(base.reshape(-1), other.reshape(-1), t)
    return kernels.slerp_combine(c0, c1, base, other, options=options)


REDUCTION_RUN = 1 << 20
"""Elements per run of SLERP's reductions. mergekit 0.1.5 reduces a tensor it merges on its
own in runs of 2^20 elements (the norm of the runs' norms, the sum of the runs' dot
products); distmerge reduces in the same runs, so float32 results agree bit for bit."""


def coefficients(v0: torch.Tensor, v1: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c₀, c₁) of SLERP's combine c₀·θ₀ + c₁·θ₁ for flat θ₀, θ₁: float32 0-d tensors, not
    Python floats, and every reduction in mergekit's runs and shapes, so that results agree
    with mergekit bitwise."""
    t = torch.tensor(t, dtype=v0.dtype)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    runs = chunk_ranges(a.shape[1], REDUCTION_RUN)
    if not runs:
        return 1 - t, t

    def norm(x: torch.Tensor) -> torch.Tensor:
        parts = torch.stack([torch.linalg.vector_norm(x[:, i:j], dim=1, keepdim=True) for i, j in runs])
        n = torch.linalg.vector_norm(parts, dim=0)
        return torch.where(n > EPS, n, 1)

    n0, n1 = norm(a), norm(b)
    dot = torch.stack([((a[:, i:j] / n0) * (b[:, i:j] / n1)).sum(dim=1, keepdim=True) for i, j in runs])
    cos_omega = dot.sum(dim=0).clamp(-1, 1)[0, 0]
    if cos_omega.abs() > DOT_THRESHOLD:
        return 1 - t, t  # (1 − t)·θ₀ + t·θ₁
    omega = torch.acos(cos_omega)
    sin_omega = torch.sin(omega)
    return torch.sin((1 - t) * omega) / sin_omega, torch.sin(t * omega) / sin_omega


def slerp_chunked(read, shape: tuple[int, ...], chunk: int, *, t: float, options=None):
    """``slerp`` for a tensor read in flat chunks, the same bits with less memory traffic:
    pass 1 gathers θ₀ and θ₁ in float32 and reduces them exactly as ``slerp`` does (the
    norms and cos Ω are whole-tensor sums); pass 2 combines chunk by chunk."""
    numel = math.prod(shape)
    v0, v1 = torch.empty(numel), torch.empty(numel)
    ranges = chunk_ranges(numel, chunk)
    for i, j in ranges:
        base, (other,) = read(i, j)
        v0[i:j], v1[i:j] = base, other
    c0, c1 = coefficients(v0, v1, t)
    for i, j in ranges:
        yield i, j, kernels.slerp_combine(c0, c1, v0[i:j], v1[i:j], options=options)


METHODS = (
    Method(
        name="slerp",
        merge=slerp,
        params=(Param("t", float, check=fraction, doc="interpolation factor: 0 = base model, 1 = the other model"),),
        base="required",
        min_inputs=1,
        max_inputs=1,
        summary="Spherical interpolation between the base and one other model.",
        paper="https://en.wikipedia.org/wiki/Slerp",
        chunked=slerp_chunked,
        kernel_options=True,
    ),
)
