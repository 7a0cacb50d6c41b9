"""SLERP: spherical linear interpolation between the base and one other model."""

from __future__ import annotations

import torch

from distmerge import kernels
from distmerge.methods import Method, Param, fraction

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
    # The coefficients are float32 tensors, not Python floats, so results agree with mergekit bitwise.
    t = torch.tensor(t, dtype=base.dtype)
    v0, v1 = base.reshape(1, -1), other.reshape(1, -1)
    n0, n1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    n0 = torch.where(n0 > EPS, n0, 1)
    n1 = torch.where(n1 > EPS, n1, 1)
    cos_omega = ((v0 / n0) * (v1 / n1)).sum(dim=1).clamp(-1, 1)[0]
    if cos_omega.abs() > DOT_THRESHOLD:
        return kernels.slerp_combine(1 - t, t, base, other)  # (1 − t)·θ₀ + t·θ₁
    omega = torch.acos(cos_omega)
    sin_omega = torch.sin(omega)
    return kernels.slerp_combine(torch.sin((1 - t) * omega) / sin_omega, torch.sin(t * omega) / sin_omega, base, other)


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
    ),
)
