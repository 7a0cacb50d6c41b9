"""Interpolation on the sphere: NuSLERP (two models), Multi-SLERP and the Karcher mean (many).

These treat a tensor (or each of its rows) as one vector, interpolate its direction on
the unit sphere and its length linearly; they follow mergekit 0.1.5's definitions.
"""

from __future__ import annotations

import torch

from distmerge.errors import MergeError
from distmerge.methods import Method, Param, non_negative

# ---------------------------------------------------------------- nuslerp


def _slerp_last_axis(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Slerp of each vector along the last axis: (sin((1−t)Ω) v₀ + sin(tΩ) v₁) / sin Ω.

    cos Ω = v̂₀·v̂₁ with v̂ = v / max(‖v‖, 1e-7); where 1 − cos²Ω ≤ eps² (parallel or
    antiparallel) the result is the linear (1−t) v₀ + t v₁. Lengths are not normalized:
    the result's length interpolates between ‖v₀‖ and ‖v₁‖.
    """
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    parallel = (1 - cos.square()) <= eps**2
    omega = torch.acos(torch.where(parallel, 0.0, cos))
    spherical = (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)
    return torch.where(parallel, (1 - t) * v0 + t * v1, spherical)


def nuslerp(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    *,
    weight: list[float],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> torch.Tensor:
    """Slerp between two models at t = w₂ / (w₁ + w₂) (t = ½ when w₁ + w₂ ≈ 0).

    With a base, the task vectors are interpolated: θ = θ₀ + slerp(t, θ₁ − θ₀, θ₂ − θ₀).
    The vectors are the whole tensor (``nuslerp_flatten``, the default), else the rows
    along the last axis, or with ``nuslerp_row_wise`` the slices along axis 0 (mergekit
    swaps axis 0 with the last one).
    """
    a, b = tensors
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if base is not None:
        a, b = a - base, b - base
    if nuslerp_flatten:
        out = _slerp_last_axis(t, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
    elif nuslerp_row_wise:
        out = _slerp_last_axis(t, a.transpose(0, -1), b.transpose(0, -1)).transpose(0, -1)
    else:
        out = _slerp_last_axis(t, a, b)
    return out if base is None else base + out


# ---------------------------------------------------------------- multislerp


def multislerp(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    *,
    weight: list[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere, in the tangent space at the mean.

    With xᵢ = θᵢ − θ₀ (or θᵢ without base), weights wᵢ (÷ Σw when normalizing),
    uᵢ = xᵢ / (‖xᵢ‖ + eps)::

        μ = Σ wᵢuᵢ / ‖Σ wᵢuᵢ‖,   v = Σ wᵢ (uᵢ − (uᵢ·μ) μ),   s = ‖v‖ + eps
        θ = θ₀ + (Σ wᵢ‖xᵢ‖) · (cos(s) μ + sin(s) v / s)

    (Goddard, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea). One model is
    returned as is; if ‖Σ wᵢuᵢ‖ < eps two models are averaged linearly and more fail.
    """
    if len(tensors) == 1:
        return tensors[0]
    x = torch.stack(tensors)
    if base is not None:
        x -= base
    flat = x.view(len(tensors), -1)
    w = torch.tensor(weight, dtype=x.dtype, device=x.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise MergeError(
                "multislerp: the weighted directions of the models cancel out (e.g. antipodal "
                "tensors with equal weights); use different weights"
            )
        out = x[0] * w[0] + x[1] * w[1]
    else:
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        tangent = (tangents * w[:, None]).sum(0)
        size = torch.linalg.vector_norm(tangent) + eps
        direction = mean * torch.cos(size) + tangent * (torch.sin(size) / size)
        out = (direction * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return out if base is None else out + base


# ---------------------------------------------------------------- karcher


def _karcher_direction(units: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """Riemannian gradient descent for argmin_μ Σ αᵢ d(μ, uᵢ)² on the unit sphere.

    Starts at the normalized weighted mean; each step moves μ along the mean of the
    log maps v = Σ αᵢ θᵢ/sin θᵢ (uᵢ − cos θᵢ μ), θᵢ = arccos(μ·uᵢ), by the exponential map
    μ ← cos‖v‖ μ + sin‖v‖ v/‖v‖, until ‖v‖ < tol or max_iter steps.
    """
    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(alphas, units):
        mean += alpha * unit
    norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if norm < tol else mean / norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(alphas, units):
            cos = torch.dot(mean.flatten(), unit.flatten()).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if theta < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - cos * mean)
        step = torch.linalg.vector_norm(tangent)
        if step < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        norm = torch.linalg.vector_norm(mean)
        if norm > tol:
            mean = mean / norm
    return mean


def karcher(base: None, tensors: list[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Karcher (Fréchet) mean on the sphere, scaled by the mean length: θ = (Σ ‖θᵢ‖/n) μ.

    μ is the Riemannian mean of the directions θᵢ/‖θᵢ‖ of the models whose norm exceeds
    tol, with equal weights (see ``_karcher_direction``). All models at most tol in norm
    give zeros. https://arxiv.org/abs/2603.04972
    """
    n = len(tensors)
    if n == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha = 1.0 / n
    total = sum([alpha] * len(valid))  # summed like mergekit, so the rounding agrees
    units = [tensors[i] / norms[i] for i in valid]
    mean = _karcher_direction(units, [alpha / total] * len(valid), max_iter, tol)
    scale = sum(alpha * norm for norm in norms)
    return scale * mean


METHODS = (
    Method(
        name="nuslerp",
        merge=nuslerp,
        params=(
            Param("weight", float, scope="input", doc="relative weight of each of the two models"),
            Param("nuslerp_row_wise", bool, False, doc="slerp the slices along axis 0 instead of the rows"),
            Param("nuslerp_flatten", bool, True, doc="slerp the whole tensor as one vector"),
        ),
        base="optional",
        min_inputs=2,
        max_inputs=2,
        summary="Slerp between two models (or their task vectors) at t = w2 / (w1 + w2).",
        paper="https://en.wikipedia.org/wiki/Slerp",
    ),
    Method(
        name="multislerp",
        merge=multislerp,
        params=(
            Param("weight", float, scope="input", doc="weight of each model"),
            Param("normalize_weights", bool, True, doc="divide the weights by their sum"),
            Param("eps", float, 1e-8, check=non_negative, doc="guard against division by zero"),
        ),
        base="optional",
        min_inputs=1,
        divides_by_weight_sum="normalize_weights",
        summary="Weighted spherical interpolation of many models (or task vectors).",
        paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    ),
    Method(
        name="karcher",
        merge=karcher,
        params=(
            Param("max_iter", int, 10, check=non_negative, doc="most gradient steps"),
            Param("tol", float, 1e-5, check=non_negative, doc="stop when the step is smaller"),
        ),
        base="ignored",
        min_inputs=1,
        summary="Riemannian (Karcher) mean of the models' directions, scaled by their mean norm.",
        paper="https://arxiv.org/abs/2603.04972",
    ),
)
