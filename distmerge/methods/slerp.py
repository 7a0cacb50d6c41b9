"""SLERP: spherical linear interpolation between the base and one other model."""

from __future__ import annotations

import math

import torch

from distmerge import kernels
from distmerge.methods import Method, Param, chunk_ranges, fraction

DOT_THRESHOLD = 0.9995
"""Above this |cos θ| the two tensors are (anti)parallel and SLERP falls back to LERP."""
EPS = 1e-8


def slerp(base: torch.Tensor, tensors: list[torch.Tensor], *, t: float) -> torch.Tensor:
    """θ = sin((1−t)Ω)/sin Ω · θ₀ + sin(tΩ)/sin Ω · θ₁, with cos Ω = θ₀·θ₁ / (|θ₀| |θ₁|).

    Shoemake 1985, "Animating rotation with quaternion curves"; the whole tensor is
    one vector. t = 0 gives the base, t = 1 the other model. Nearly parallel tensors
    (|cos Ω| > 0.9995) are interpolated linearly, as in mergekit.
    """
    (other,) = tensors
    c0, c1 = coefficients(base.reshape(-1), other.reshape(-1), t)
    return kernels.slerp_combine(c0, c1, base, other)


def coefficients(v0: torch.Tensor, v1: torch.Tensor, t: float, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(c₀, c₁) of SLERP's combine c₀·θ₀ + c₁·θ₁ for flat θ₀, θ₁: float32 0-d tensors, not
    Python floats, so results agree with mergekit bitwise. With ``chunk``, the normalized
    product is computed chunk by chunk into one buffer (same values, same sum)."""
    t = torch.tensor(t, dtype=v0.dtype)
    n0, n1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    n0 = torch.where(n0 > EPS, n0, 1)
    n1 = torch.where(n1 > EPS, n1, 1)
    if chunk is None:
        product = (v0 / n0) * (v1 / n1)
    else:
        product = torch.empty_like(v0)
        for i in range(0, v0.numel(), chunk):
            torch.mul(v0[i : i + chunk] / n0, v1[i : i + chunk] / n1, out=product[i : i + chunk])
    cos_omega = product.reshape(1, -1).sum(dim=1).clamp(-1, 1)[0]
    del product
    if cos_omega.abs() > DOT_THRESHOLD:
        return 1 - t, t  # (1 − t)·θ₀ + t·θ₁
    omega = torch.acos(cos_omega)
    sin_omega = torch.sin(omega)
    return torch.sin((1 - t) * omega) / sin_omega, torch.sin(t * omega) / sin_omega


def slerp_chunked(read, shape: tuple[int, ...], chunk: int, *, t: float):
    """``slerp`` for a tensor read in flat chunks, the same bits with less memory traffic:
    pass 1 gathers θ₀ and θ₁ in float32 and reduces them exactly as ``slerp`` does (the
    norms and cos Ω are whole-tensor sums); pass 2 combines chunk by chunk."""
    numel = math.prod(shape)
    v0, v1 = torch.empty(numel), torch.empty(numel)
    ranges = chunk_ranges(numel, chunk)
    for i, j in ranges:
        base, (other,) = read(i, j)
        v0[i:j], v1[i:j] = base, other
    c0, c1 = coefficients(v0, v1, t, chunk)
    for i, j in ranges:
        yield i, j, kernels.slerp_combine(c0, c1, v0[i:j], v1[i:j])


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
    ),
)
