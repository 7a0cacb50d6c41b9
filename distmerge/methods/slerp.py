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
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    return _coefficients(lambda i, j: (a[:, i:j], b[:, i:j]), a.shape[1], t, v0.dtype, v0.device)


def _coefficients(run, numel: int, t: float, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``coefficients`` of θ₀, θ₁ of ``numel`` elements given run by run: ``run(i, j)`` is
    (θ₀, θ₁) of the run [i, j) as (1, j − i) tensors, asked for each run in order, twice (the
    runs' norms first, then, with the whole-tensor norms, their dot products). A run's
    reductions read only its own values, so they are the same bits whether it is a view of
    the whole tensor or a buffer of its own."""
    t = torch.tensor(t, dtype=dtype)
    runs = chunk_ranges(numel, REDUCTION_RUN)
    if not runs:
        return 1 - t, t

    # Every run's reductions go into tensors allocated up front, and the dot's products into
    # two scratch buffers of a run, not into fresh tensors: a small result kept until all
    # runs are done would pin the freed temporaries below it in the heap (glibc), and the
    # resident memory of a chunked merge would grow by a run's temporaries per run.
    norms = torch.empty(2, len(runs), 1, 1, dtype=dtype, device=device)  # θ₀'s and θ₁'s, stacked as in mergekit
    products = torch.empty(len(runs), 1, 1, dtype=dtype, device=device)
    scratch = torch.empty(2, 1, min(numel, REDUCTION_RUN), dtype=dtype, device=device)
    for k, (i, j) in enumerate(runs):
        for x, out in zip(run(i, j), norms[:, k]):
            torch.linalg.vector_norm(x, dim=1, keepdim=True, out=out)
    n0, n1 = (torch.where(n > EPS, n, 1) for n in (torch.linalg.vector_norm(part, dim=0) for part in norms))
    for k, (i, j) in enumerate(runs):
        a, b = run(i, j)
        p, q = scratch[:, :, : j - i]
        torch.sum(torch.div(a, n0, out=p).mul_(torch.div(b, n1, out=q)), dim=1, keepdim=True, out=products[k])
    cos_omega = products.sum(dim=0).clamp(-1, 1)[0, 0]
    if cos_omega.abs() > DOT_THRESHOLD:
        return 1 - t, t  # (1 − t)·θ₀ + t·θ₁
    omega = torch.acos(cos_omega)
    sin_omega = torch.sin(omega)
    return torch.sin((1 - t) * omega) / sin_omega, torch.sin(t * omega) / sin_omega


def slerp_chunked(read, shape: tuple[int, ...], chunk: int, *, t: float, options=None):
    """``slerp`` for a tensor read in flat chunks, the same bits in bounded memory: θ₀ and
    θ₁ are gathered one reduction run (REDUCTION_RUN elements) at a time into two float32
    buffers of a run, from which ``coefficients``' reductions are taken run by run: pass 1
    the runs' norms, pass 2 (the whole-tensor norms now known) their dot products; pass 3
    combines chunk by chunk. A tensor of one run is read once and stays in the buffers.
    Three reads cost less than the float32 copies of the whole of θ₀ and θ₁ that they
    replace (2 × 262 MB for a 32000 × 2048 embedding, every page of them faulted in fresh):
    that tensor merges in about half the time, in 0.5 GB less resident memory (issue #20)."""
    numel = math.prod(shape)
    a, b = torch.empty(1, min(numel, REDUCTION_RUN)), torch.empty(1, min(numel, REDUCTION_RUN))
    held = None  # the run [i, j) that the buffers hold

    def run(i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal held
        if held != (i, j):
            for start, end in chunk_ranges(j - i, chunk):  # widened straight into the buffers
                read(i + start, i + end, out=[a[0, start:], b[0, start:]])
            held = (i, j)
        return a[:, : j - i], b[:, : j - i]

    c0, c1 = _coefficients(run, numel, t, torch.float32, "cpu")
    if held == (0, numel):  # one run: the whole tensor is in the buffers
        for i, j in chunk_ranges(numel, chunk):
            yield i, j, kernels.slerp_combine(c0, c1, a[0, i:j], b[0, i:j], options=options)
        return
    staging = list(torch.empty(2, min(numel, chunk)))  # a chunk of θ₀ and θ₁, widened in place
    for i, j in chunk_ranges(numel, chunk):
        base, (other,) = read(i, j, out=staging)
        yield i, j, kernels.slerp_combine(c0, c1, base, other, options=options)


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
