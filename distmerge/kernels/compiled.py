"""Fused CPU loops for the element-wise steps: torch.compile's C++ backend over the references' math.

Plain torch runs one pass over memory per operation: θ₀ + λ·Σᵢ wᵢ(θᵢ − θ₀) from bf16 inputs is
about a dozen passes (casts, differences, products, sums, the final rounding), each allocating
its result. Here the same operations, in the same order, are traced by ``torch.compile`` and
inductor generates one vectorized C++ loop that reads each input once and writes the result
once. Inductor builds with ``-ffp-contract=off`` (no multiply-add is fused behind our back)
and keeps divisions as divisions, so the results are the references' bits; tests compare them
on random and adversarial inputs (tests/test_kernels_compiled.py).

- Weights, λ and divisors arrive as float32 tensors, not Python floats, so one compiled
  loop serves every recipe (no recompilation per value) and every scalar is rounded to
  float32 exactly as the references round it. Shapes are dynamic: one compilation per
  function, number of inputs, dtypes and flags, cached on disk by inductor across runs.
- ``linear_sum`` is not here: the reference accumulates with ``addcmul_``, which torch's
  own CPU kernel rounds once (an FMA); a compiled loop rounds ``w·x`` and the sum separately.
- If compiling fails (no C++ compiler, an unsupported CPU), a warning is printed once and
  the same functions run eagerly: the reference path, unchanged.
- Below ``MIN_ELEMENTS`` the call overhead of a compiled function (guards, about 20–50 µs)
  outweighs the gain, and the reference runs.
- Compiling costs each process about 5 s (importing inductor, then compiling or loading the
  loop from inductor's disk cache), which a 256K-element chunk repays at about 2 ms (0.14
  against 2.2 ms for θ₀ + Σᵢ wᵢτᵢ with two bf16 models, measured here). So by default
  ("auto") ``distmerge.kernels`` dispatches here only when the rank has at least
  ``WORK_TO_COMPILE`` elements to merge (``plan_work``, called by the run): a 70B merge, not
  a 1B test. The TIES
  consensus combine (sign election and disjoint mean, about fifteen torch ops per chunk)
  repays it sooner, from ``WORK_TO_COMPILE_CONSENSUS``: ties on two 2.5 GB fine-tunes took
  30.7 and 28.2 s with it against 39.9 and 36.1 s without (alternating runs), for 0.2 GB more
  resident memory (inductor's modules).

``DISTMERGE_COMPILE``: ``auto`` (default), ``1`` (always, any size of run), ``0`` (never:
the references everywhere on CPU).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from distmerge.kernels import reference
from distmerge.kernels.reference import _in, _out, linear_divisor
from distmerge.kernels.reference import dare_drop, linear_sum  # not fused (see above)

__all__ = ["dare_drop", "enabled", "linear_sum", "scale", "slerp_combine", "stock_interpolate", "task_combine", "task_merge"]

MIN_ELEMENTS = 1 << 16
"""Smallest tensor worth a compiled call."""
WORK_TO_COMPILE = 1 << 32
"""Elements a rank must merge before compiling pays, in "auto" mode (see above)."""
WORK_TO_COMPILE_CONSENSUS = 1 << 28
"""The same for the TIES consensus combine."""

_broken = False
_work = 0


def plan_work(elements: int) -> None:
    """How many elements this process is about to merge (``run.run_rank`` says so)."""
    global _work
    _work = elements


def enabled(tensor, consensus: bool = False) -> bool:
    """Whether a step on ``tensor`` runs compiled: a large CPU tensor, in a run large enough to
    repay compiling this step (the TIES ``consensus`` combine sooner; ``DISTMERGE_COMPILE=1``:
    any run), compiling not broken here."""
    if _broken or getattr(tensor, "is_cuda", False) or tensor.numel() < MIN_ELEMENTS:
        return False
    mode = os.environ.get("DISTMERGE_COMPILE", "auto").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return False
    return mode != "auto" or _work >= (WORK_TO_COMPILE_CONSENSUS if consensus else WORK_TO_COMPILE)


def _compiled(fn):
    """``fn`` compiled on first call; ``fn`` itself (eager: the reference's operations) if that fails."""
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        global _broken
        nonlocal compiled
        if not _broken:
            try:
                if compiled is None:
                    # One specialization per number of inputs, dtypes and flags: allow more than
                    # dynamo's default 8 before it would quietly run the function eagerly.
                    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                    compiled = torch.compile(fn, dynamic=True)
                return compiled(*args, **kwargs)
            except Exception as e:  # a compiler missing or failing: fall back, once, loudly
                _broken = True
                warnings.warn(f"distmerge: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); merging with plain torch ops")
        return fn(*args, **kwargs)

    return call


def _f32(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


# ---------------------------------------------------------------- the task-arithmetic family


@_compiled
def _combine(base, deltas, w, lam, divisor, *, consensus: bool, normalize: bool, scale: bool, work_dtype, out_dtype):
    """``reference.task_combine``'s operations: the same order, the same roundings."""
    weighted = [d.to(torch.float32) * w[i] for i, d in enumerate(deltas)]
    if consensus:  # distmerge.methods.consensus.disjoint_sum, then disjoint_mean_divisor
        total = weighted[0]
        for x in weighted[1:]:
            total = total + x
        sign = torch.where(total >= 0, 1.0, -1.0)
        mixed = torch.zeros_like(weighted[0])
        divisor = torch.zeros_like(weighted[0])
        for i, x in enumerate(weighted):
            agree = torch.sign(x) == sign
            mixed = mixed + torch.where(agree, x, 0.0)
            divisor = divisor + agree * w[i]
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = weighted[0]
        for x in weighted[1:]:
            mixed = mixed + x
    if normalize:
        mixed = mixed / divisor
    if scale:
        mixed = mixed * lam
    return _out(_in(base, work_dtype) + mixed, work_dtype, out_dtype)


@_compiled
def _merge(base, tensors, w, lam, divisor, *, consensus: bool, normalize: bool, scale: bool, work_dtype, out_dtype):
    """τᵢ = θᵢ − θ₀ and ``_combine``, in one loop (``reference.task_merge`` without sparsifier)."""
    b = _in(base, work_dtype)
    deltas = [_in(x, work_dtype) - b for x in tensors]
    return _combine.__wrapped__(
        b, deltas, w, lam, divisor, consensus=consensus, normalize=normalize, scale=scale,
        work_dtype=work_dtype, out_dtype=out_dtype,
    )  # fmt: skip


def _scalars(weight, lambda_, device):
    """(w, λ, linear divisor) as float32 tensors; the divisor is summed eagerly, as the reference sums it."""
    w = _f32(weight, device)
    return w, _f32(lambda_, device), linear_divisor(w)


def task_combine(base, deltas, weight, *, consensus, normalize, lambda_, work_dtype=None, out_dtype=None):
    w, lam, divisor = _scalars(weight, lambda_, base.device)
    return _combine(
        base, list(deltas), w, lam, divisor, consensus=consensus, normalize=normalize, scale=lambda_ != 1,
        work_dtype=work_dtype, out_dtype=out_dtype,
    )  # fmt: skip


def task_merge(base, tensors, weight, sparsifier=None, *, consensus, normalize, lambda_, work_dtype=None, out_dtype=None):
    if sparsifier is not None:  # the sparsifiers need whole-tensor statistics: eager, then the fused combine
        b = _in(base, work_dtype)
        deltas = [sparsifier(i, _in(x, work_dtype) - b) for i, x in enumerate(tensors)]
        return task_combine(
            b, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_,
            work_dtype=work_dtype, out_dtype=out_dtype,
        )  # fmt: skip
    w, lam, divisor = _scalars(weight, lambda_, base.device)
    return _merge(
        base, list(tensors), w, lam, divisor, consensus=consensus, normalize=normalize, scale=lambda_ != 1,
        work_dtype=work_dtype, out_dtype=out_dtype,
    )  # fmt: skip


# ---------------------------------------------------------------- SLERP, passthrough, model_stock


@_compiled
def _lerp2(c0, c1, a, b, work_dtype, out_dtype):
    return _out(c0 * _in(a, work_dtype) + c1 * _in(b, work_dtype), work_dtype, out_dtype)


def slerp_combine(c0, c1, a, b, *, work_dtype=None, out_dtype=None):
    c0, c1 = (c if isinstance(c, torch.Tensor) else _f32(c, a.device) for c in (c0, c1))
    return _lerp2(c0.to(torch.float32), c1.to(torch.float32), a, b, work_dtype, out_dtype)


@_compiled
def _scale(x, s, work_dtype, out_dtype):
    return _out(_in(x, work_dtype) * s, work_dtype, out_dtype)


def scale(x, s, *, work_dtype=None, out_dtype=None):
    if s is None:
        return reference.scale(x, None, work_dtype=work_dtype, out_dtype=out_dtype)
    return _scale(x, _f32(s, x.device), work_dtype, out_dtype)


@_compiled
def _stock(w0, models, t, work_dtype, out_dtype):
    w0 = _in(w0, work_dtype)
    models = [_in(x, work_dtype) for x in models]
    total = models[0]
    for x in models[1:]:
        total = total + x
    average = total / len(models)
    return _out(t * average + (1 - t) * w0, work_dtype, out_dtype)


def stock_interpolate(w0, models, t, *, work_dtype=None, out_dtype=None):
    return _stock(w0, list(models), t, work_dtype, out_dtype)
