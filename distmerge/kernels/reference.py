"""Plain-torch references of the fused steps: the CPU path, and what each Triton kernel must equal.

Every function here is the math the merge methods run on CPU, operation for operation (the
methods call them through ``distmerge.kernels``), so a CPU merge is unchanged by the kernels.
Each takes the same ``work_dtype`` / ``out_dtype`` as its kernel:

- ``work_dtype``: model tensors (bases, models, a passthrough input) are rounded to it and
  then computed on in float32, and the result is rounded to it — as ``run.merge_tensor``
  does with the recipe dtype. None: inputs are only converted to float32 (exact).
- ``out_dtype``: the dtype of the result (None: float32).

With both None a float32 input is used as it is, without a copy, and the result is float32.
Task vectors given explicitly (``task_combine``'s deltas, ``dare_drop``'s delta) are not
rounded to ``work_dtype``: they are differences, not checkpoint tensors.
"""

from __future__ import annotations

import torch


def _in(x: torch.Tensor, work_dtype: torch.dtype | None) -> torch.Tensor:
    """A model tensor as the math sees it: rounded to ``work_dtype``, then float32."""
    if work_dtype is not None:
        x = x.to(work_dtype)
    return x.to(torch.float32)


def _out(y: torch.Tensor, work_dtype: torch.dtype | None, out_dtype: torch.dtype | None) -> torch.Tensor:
    if work_dtype is not None:
        y = y.to(work_dtype)
    return y.to(out_dtype or torch.float32)  # no copy when it is float32 already


# ---------------------------------------------------------------- 1. weighted sums


def linear_sum(
    tensors: list[torch.Tensor],
    weight: list[float],
    *,
    normalize: bool,
    work_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Σᵢ wᵢ θᵢ (/ Σᵢ wᵢ): accumulated from 0 with one fused multiply-add per input
    (``addcmul_``, as mergekit's linear merge, so float32 results agree bitwise)."""
    tensors = [_in(x, work_dtype) for x in tensors]
    w = torch.tensor(weight, dtype=torch.float32)
    out = torch.zeros_like(tensors[0])
    for wi, x in zip(w, tensors):
        out.addcmul_(x, wi)  # out += wᵢ·θᵢ, one rounding (an FMA on CPU)
    if normalize:
        out = out / w.sum()
    return _out(out, work_dtype, out_dtype)


def task_combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weight: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    work_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """θ₀ + λ · (Σᵢ wᵢτᵢ, or its TIES disjoint version) / D — the task-arithmetic family's last step.

    Linear: Σ from the first weighted delta, D = Σᵢ wᵢ (1 when |D| < 1e-8). Consensus: the
    sign γ is elected on the weighted deltas, Σᵢ [sgn wᵢτᵢ = γ] wᵢτᵢ / Σᵢ [sgn wᵢτᵢ = γ] wᵢ,
    an exactly-zero divisor replaced by 1 (``distmerge.methods.consensus``).
    """
    from distmerge.methods.consensus import disjoint_mean_divisor, disjoint_sum

    base = _in(base, work_dtype)
    deltas = [d.to(torch.float32) for d in deltas]
    w = torch.tensor(weight, dtype=torch.float32, device=base.device)
    weighted = [delta * wi for delta, wi in zip(deltas, w)]
    if consensus:
        mixed, divisor = disjoint_sum(weighted, w)
        divisor = disjoint_mean_divisor(divisor)
    else:
        mixed = weighted[0].clone()
        for x in weighted[1:]:
            mixed += x
        divisor = linear_divisor(w)
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return _out(base + mixed, work_dtype, out_dtype)


def linear_divisor(w: torch.Tensor) -> torch.Tensor:
    """D = Σᵢ wᵢ of the float32 weights, replaced by 1 when |D| < 1e-8 (mergekit's rule)."""
    divisor = w.sum()
    return torch.ones_like(divisor) if divisor.abs() < 1e-8 else divisor


def task_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weight: list[float],
    sparsifier=None,
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    work_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The whole task-arithmetic family: τᵢ = θᵢ − θ₀, τ̂ᵢ = sparsifier(i, τᵢ), then ``task_combine``.

    ``sparsifier`` is None (no sparsification) or a callable ``(i, τᵢ) -> τ̂ᵢ``; the
    ``distmerge.kernels`` sparsifiers (TopK, Outliers, RandomDrop, Masked) are such callables
    that the Triton path can also run inside its kernel.
    """
    base = _in(base, work_dtype)
    deltas = [_in(x, work_dtype) - base for x in tensors]
    if sparsifier is not None:
        deltas = [sparsifier(i, delta) for i, delta in enumerate(deltas)]
    return task_combine(
        base, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_, out_dtype=out_dtype,
        work_dtype=work_dtype,
    )


# ---------------------------------------------------------------- 3. DARE drop and rescale


def dare_drop(
    delta: torch.Tensor,
    density: float,
    seed: int,
    rescale: bool = True,
    *,
    offset: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """δ ⊙ m, m_j = [uniform(seed)[offset + j] < density] (j the row-major index), times
    ‖δ‖₁ / ‖δ ⊙ m‖₁ when ``rescale`` (mergekit 0.1.5's rescale; see ``sparsify.masked``).
    density ≥ 1 returns δ itself (no draw, no rescale), as ``sparsify.random``."""
    from distmerge import rng
    from distmerge.methods.sparsify import masked

    delta = delta.to(torch.float32)
    if density >= 1:
        return _out(delta, None, out_dtype)
    keep = rng.bernoulli_keep(seed, delta.shape, density, offset=offset, device=delta.device)
    return _out(masked(delta, keep, rescale), None, out_dtype)


# ---------------------------------------------------------------- 4. SLERP's combine, 5. scale


def slerp_combine(
    c0: torch.Tensor | float,
    c1: torch.Tensor | float,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    work_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """c₀·a + c₁·b with float32 coefficients (two products, one sum: no fused multiply-add)."""
    a, b = _in(a, work_dtype), _in(b, work_dtype)
    return _out(c0 * a + c1 * b, work_dtype, out_dtype)


def scale(
    x: torch.Tensor,
    s: float | None,
    *,
    work_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """s · x (x itself when s is None); s is rounded to float32."""
    x = _in(x, work_dtype)
    return _out(x if s is None else x * s, work_dtype, out_dtype)


# ---------------------------------------------------------------- model_stock's last step


def stock_interpolate(
    w0: torch.Tensor,
    models: list[torch.Tensor],
    t: torch.Tensor,
    *,
    work_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """t θ̄ + (1 − t) θ₀ with θ̄ = Σᵢ θᵢ / N (summed in order from 0); t is float32 of
    shape [1] (one ratio) or w0.shape[:-1] + [1] (one per row of the last axis)."""
    w0 = _in(w0, work_dtype)
    models = [_in(x, work_dtype) for x in models]
    average = sum(models) / len(models)
    return _out(t * average + (1 - t) * w0, work_dtype, out_dtype)
