"""Fused CPU loops for the element-wise steps: torch.compile's C++ backend over the references' math.

Plain torch runs one pass over memory per operation: θ₀ + λ·Σᵢ wᵢ(θᵢ − θ₀) from bf16 inputs is
about a dozen passes (casts, differences, products, sums, the final rounding), each allocating
its result. Here the same operations, in the same order, are traced by ``torch.compile`` and
inductor generates one vectorized C++ loop that reads each input once and writes the result
once. Inductor builds with ``-ffp-contract=off`` (no multiply-add is fused behind our back)
and keeps divisions as divisions, so the results are the references' bits; tests compare them
on random and adversarial inputs (tests/kernels/test_kernels_compiled.py).

- Weights, λ and divisors arrive as float32 tensors, not Python floats, so one compiled
  loop serves every recipe (no recompilation per value) and every scalar is rounded to
  float32 exactly as the references round it. Shapes are dynamic: one compilation per
  function, number of inputs, dtypes and flags, cached on disk by inductor across runs.
- ``linear_sum`` is not here: the reference accumulates with ``addcmul_``, which torch's
  own CPU kernel rounds once (an FMA); a compiled loop rounds ``w·x`` and the sum separately.
- If compiling fails (no C++ compiler, an unsupported CPU), a warning is printed and that
  loop runs its operations eagerly from then on: the reference's bits (``fell_back``).
- Below ``MIN_ELEMENTS`` the call overhead of a compiled function (guards, about 20–50 µs)
  outweighs the gain, and the reference runs.
- Compiling costs each process about 5 s (importing inductor, then compiling or loading the
  loop from inductor's disk cache), which a 256K-element chunk repays at about 2 ms (0.14
  against 2.2 ms for θ₀ + Σᵢ wᵢτᵢ with two bf16 models, measured here). So by default
  ("auto") ``distmerge.kernels`` dispatches here only when the rank has at least
  ``WORK_TO_COMPILE`` elements to merge (``KernelOptions.work``, set once per rank by the
  run): a 70B merge, not a 1B test. The TIES
  consensus combine (sign election and disjoint mean, about fifteen torch ops per chunk)
  repays it sooner, from ``WORK_TO_COMPILE_CONSENSUS``: ties on two 2.5 GB fine-tunes took
  30.7 and 28.2 s with it against 39.9 and 36.1 s without (alternating runs), for 0.2 GB more
  resident memory (inductor's modules).

Whether to compile is ``KernelOptions.compile`` ("auto", "always", "never"), decided once per
run and passed down with every call (``enabled``).
"""

from __future__ import annotations

import functools
import warnings

import torch

from distmerge.kernels import reference
from distmerge.kernels.reference import disjoint_sum, linear_divisor, linear_sum, total  # linear_sum: not fused (see above)

__all__ = ["enabled", "fell_back", "linear_sum", "scale", "slerp_combine", "stock_interpolate", "task_combine", "task_merge"]

MIN_ELEMENTS = 1 << 16
"""Smallest tensor worth a compiled call."""
WORK_TO_COMPILE = 1 << 32
"""Elements a rank must merge before compiling pays, in "auto" mode (see above)."""
WORK_TO_COMPILE_CONSENSUS = 1 << 28
"""The same for the TIES consensus combine."""


def enabled(tensor, options, consensus: bool = False) -> bool:
    """Whether a step on ``tensor`` runs compiled under ``options`` (a ``KernelOptions``): a
    large CPU tensor, and compile "always", or "auto" in a run large enough to repay compiling
    this step (the TIES ``consensus`` combine sooner)."""
    if getattr(tensor, "is_cuda", False) or tensor.numel() < MIN_ELEMENTS or options.compile == "never":
        return False
    return options.compile == "always" or options.work >= (WORK_TO_COMPILE_CONSENSUS if consensus else WORK_TO_COMPILE)


_LOOPS = []
"""Every ``_compiled`` function (see ``fell_back``)."""


def fell_back() -> list[str]:
    """The compiled loops that failed to compile in this process and run eagerly instead."""
    return [loop.__name__ for loop in _LOOPS if loop.failed]


def _compiled(fn):
    """``fn`` compiled on first call; ``fn`` itself (eager: the reference's operations, the
    same bits) from the first failure on, after one warning."""
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if not call.failed:
            try:
                if compiled is None:
                    # One specialization per number of inputs, dtypes and flags: allow more than
                    # dynamo's default 8 before it would quietly run the function eagerly.
                    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                    compiled = torch.compile(fn, dynamic=True)
                return compiled(*args, **kwargs)
            except Exception as e:  # a compiler missing or failing: fall back, loudly
                call.failed = True
                warnings.warn(f"distmerge: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); merging with plain torch ops")
        return fn(*args, **kwargs)

    call.failed = False
    _LOOPS.append(call)
    return call


def _f32(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


# ---------------------------------------------------------------- the task-arithmetic family


@_compiled
def _combine(base, deltas, w, lam, divisor, *, consensus: bool, normalize: bool, scale: bool):
    """``reference.task_combine``'s operations: the same functions, the same roundings."""
    weights = [w[i] for i in range(len(deltas))]  # indexed, not iterated: dynamo unrolls a list
    weighted = [d.to(torch.float32) * wi for d, wi in zip(deltas, weights)]
    if consensus:
        mixed, divisor = disjoint_sum(weighted, weights)
    else:
        mixed = total(weighted)
    if normalize:
        mixed = mixed / divisor
    if scale:
        mixed = mixed * lam
    return base.to(torch.float32) + mixed


@_compiled
def _merge(base, tensors, w, lam, divisor, *, consensus: bool, normalize: bool, scale: bool):
    """τᵢ = θᵢ − θ₀ and ``_combine``, in one loop (``reference.task_merge`` without a keep rule)."""
    b = base.to(torch.float32)
    deltas = [x.to(torch.float32) - b for x in tensors]
    return _combine.__wrapped__(b, deltas, w, lam, divisor, consensus=consensus, normalize=normalize, scale=scale)


def _scalars(weight, lambda_, device):
    """(w, λ, linear divisor) as float32 tensors; the divisor is summed eagerly, as the reference sums it."""
    w = _f32(weight, device)
    return w, _f32(lambda_, device), linear_divisor(w)


def task_combine(base, deltas, weight, *, consensus, normalize, lambda_):
    w, lam, divisor = _scalars(weight, lambda_, base.device)
    flags = dict(consensus=consensus, normalize=normalize, scale=lambda_ != 1)
    return _combine(base, list(deltas), w, lam, divisor, **flags)


def task_merge(base, tensors, weight, keep=None, *, consensus, normalize, lambda_):
    if keep is not None:  # a rescale needs whole-tensor norms: sparsify eagerly, then the fused combine
        b = base.to(torch.float32)
        deltas = [reference.sparsified(x.to(torch.float32) - b, rule, keep.rescale) for x, rule in zip(tensors, keep.rules)]
        return task_combine(b, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)
    w, lam, divisor = _scalars(weight, lambda_, base.device)
    flags = dict(consensus=consensus, normalize=normalize, scale=lambda_ != 1)
    return _merge(base, list(tensors), w, lam, divisor, **flags)


# ---------------------------------------------------------------- SLERP, passthrough, model_stock


@_compiled
def _lerp2(c0, c1, a, b):
    return c0 * a.to(torch.float32) + c1 * b.to(torch.float32)


def slerp_combine(c0, c1, a, b):
    c0, c1 = (c if isinstance(c, torch.Tensor) else _f32(c, a.device) for c in (c0, c1))
    return _lerp2(c0.to(torch.float32), c1.to(torch.float32), a, b)


@_compiled
def _scale(x, s):
    return x.to(torch.float32) * s


def scale(x, s):
    if s is None:
        return reference.scale(x, None)
    return _scale(x, _f32(s, x.device))


@_compiled
def _stock(w0, models, t):
    w0 = w0.to(torch.float32)
    models = [x.to(torch.float32) for x in models]
    summed = models[0]
    for x in models[1:]:
        summed = summed + x
    average = summed / len(models)
    return t * average + (1 - t) * w0


def stock_interpolate(w0, models, t):
    return _stock(w0, list(models), t)
