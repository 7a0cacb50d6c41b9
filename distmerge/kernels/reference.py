"""Plain-torch references of the fused steps: the CPU path, and what each Triton kernel must equal.

Every function here is the math the merge methods run on CPU, operation for operation (the
methods call them through ``distmerge.kernels``). Model tensors may be stored in float32,
float16 or bfloat16 (an element-wise method gets its chunks as stored): they are widened to
float32, exactly, and results are float32. A float32 input is used as it is, without a copy.

The steps several paths share are written once, here: the TIES sign election and disjoint
mean, the linear divisor, the L1 rescale and its epsilon, and what a ``keep`` rule keeps.
(``compiled`` traces these same functions; ``triton_kernels`` is their Triton transcription.)
"""

from __future__ import annotations

import torch

from distmerge import rng
from distmerge.kernels.keep import CUT_ALL, CUT_NONE, Band, Draw, Rule, Top

RESCALE_EPS = 1e-7
"""Below this L1 norm (before or after masking) mergekit returns the mask unrescaled."""


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


def on_device_of(x: torch.Tensor, value: torch.Tensor | float) -> torch.Tensor:
    """``value`` (a number or a 0-d tensor) as a float32 0-d tensor on ``x``'s device: a divisor.

    On CUDA, torch divides by a number or by a 0-d CPU tensor as a multiplication by its
    reciprocal, up to an ulp off the quotient (measured on an H200, torch 2.11: 522 of 4097
    entries of ``linear_sum``'s division); by a tensor on the same device it divides, correctly
    rounded, as the CPU does either way. A no-op on CPU."""
    return torch.as_tensor(value, dtype=torch.float32).to(x.device)


def total(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ in list order from the first term (for up to four inputs the rounding of a stacked sum)."""
    out = tensors[0].clone()
    for x in tensors[1:]:
        out += x
    return out


# ---------------------------------------------------------------- TIES sign consensus


def elect_sign(deltas: list[torch.Tensor]) -> torch.Tensor:
    """γ = +1 where Σᵢ τᵢ ≥ 0, else −1 (TIES "elect", mergekit's "sum" consensus), float32.

    Yadav et al. 2023, "TIES-Merging" (https://arxiv.org/abs/2306.01708), step 2: the sign
    of the larger total mass; an entry with Σᵢ τᵢ = 0 elects +1.
    """
    return torch.where(total(deltas) >= 0, 1.0, -1.0)


def agrees(delta: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """[sgn τ = γ]: True where a delta has the elected sign (never where τ = 0)."""
    return torch.sign(delta) == sign


def disjoint_sum(deltas: list[torch.Tensor], weights: list[float] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σᵢ [sgn τᵢ = γ] τᵢ, D) with γ = ``elect_sign(τ)`` and D = Σᵢ [sgn τᵢ = γ] wᵢ, exact
    zeros (no model agrees) replaced by 1: TIES's "disjoint merge" (step 3), and the divisor
    of its disjoint *mean*, the total weight of the models that agree at each entry."""
    sign = elect_sign(deltas)
    mixed = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        agree = agrees(delta, sign)
        mixed += torch.where(agree, delta, 0.0)
        divisor += agree * weight
    return mixed, divisor.masked_fill_(divisor == 0, 1.0)


def linear_divisor(w: torch.Tensor) -> torch.Tensor:
    """D = Σᵢ wᵢ of the float32 weights, replaced by 1 when |D| < 1e-8 (mergekit's rule)."""
    divisor = w.sum()
    return torch.ones_like(divisor) if divisor.abs() < 1e-8 else divisor


# ---------------------------------------------------------------- what a keep rule keeps


def kept(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x where ``keep``, +0 elsewhere: ``torch.where(keep, x, 0.0)``, bit for bit (NaN, Inf
    and −0 included), for a float32 CPU tensor as an integer AND of x's bits with the mask
    widened to all-ones words. torch's CPU kernels that read a boolean mask are slow in the
    build this project pins: on 256K elements, one thread, ``torch.where`` took 746-809 µs
    and ``masked_fill_`` 772 µs, this 83-92 µs (measured side by side)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or keep.shape != x.shape:
        return torch.where(keep, x, 0.0)
    words = keep.to(torch.int32).neg_()  # True: -1, all bits set; False: 0
    return words.bitwise_and_(x.view(torch.int32)).view(torch.float32)


def masked(delta: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """δ ⊙ m, times ‖δ‖₁ / ‖δ ⊙ m‖₁ when ``rescale``.

    This is what "rescale" means in mergekit 0.1.5 for every sparsification: the kept
    entries are scaled so the L1 norm of the delta is preserved. It is not DARE's
    1/density (the two agree only in expectation, for random drops). Either norm below
    ``RESCALE_EPS`` leaves the masked delta unscaled.
    """
    result = kept(keep, delta)
    if not rescale:
        return result
    before = delta.abs().sum()
    after = result.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return result
    return result * (before / after)


def in_top(magnitudes: torch.Tensor, top: Top) -> torch.Tensor:
    """The bool mask of ``top``: |τ| > threshold, or = threshold up to the flat index ``cut``."""
    if top.cut == CUT_ALL:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    flat = magnitudes.reshape(-1)  # row-major, whatever the strides
    keep = flat > top.threshold
    ties = flat == top.threshold
    ties[top.cut + 1 :] = False
    return (keep | ties).view(magnitudes.shape)


def keep_mask(rule: Rule, delta: torch.Tensor) -> torch.Tensor:
    """The bool mask of a rule that is not None (``distmerge.kernels.keep``) for a delta."""
    if isinstance(rule, torch.Tensor):
        return rule
    if isinstance(rule, Draw):
        return rng.bernoulli_keep(rule.seed, delta.shape, rule.p, device=delta.device)
    if isinstance(rule, Band):
        magnitudes = delta.abs()
        keep = in_top(magnitudes, rule.top)
        if rule.skip.cut != CUT_NONE:
            keep &= ~in_top(magnitudes, rule.skip)
        return keep
    raise TypeError(f"not a keep rule: {rule!r}")


def sparsified(delta: torch.Tensor, rule: Rule, rescale: bool) -> torch.Tensor:
    """τ̂ = τ ⊙ m (``masked``) for the mask of ``rule``; τ itself when the rule is None."""
    return delta if rule is None else masked(delta, keep_mask(rule, delta), rescale)


# ---------------------------------------------------------------- weighted sums


def linear_sum(tensors: list[torch.Tensor], weight: list[float], *, normalize: bool) -> torch.Tensor:
    """Σᵢ wᵢ θᵢ (/ Σᵢ wᵢ): accumulated from 0 with one fused multiply-add per input
    (``addcmul_``, as mergekit's linear merge, so float32 results agree bitwise)."""
    tensors = [_f32(x) for x in tensors]
    w = torch.tensor(weight, dtype=torch.float32)
    out = torch.zeros_like(tensors[0])  # (addcmul from a broadcast 0-d zero gives the same bits, 2.5-3x slower)
    for wi, x in zip(w, tensors):
        out.addcmul_(x, wi)  # out += wᵢ·θᵢ, one rounding (an FMA on CPU)
    if normalize:
        out.div_(on_device_of(out, w.sum()))  # in place, as mergekit divides: the same bits without a temporary
    return out


def task_combine(
    base: torch.Tensor, deltas: list[torch.Tensor], weight: list[float], *, consensus: bool, normalize: bool, lambda_: float
) -> torch.Tensor:
    """θ₀ + λ · (Σᵢ wᵢτᵢ, or its TIES disjoint version) / D — the task-arithmetic family's last step.

    Linear: Σ from the first weighted delta, D = ``linear_divisor`` (summed on the CPU: a
    GPU adds the weights in another order). Consensus: the sign γ is elected on the weighted
    deltas, Σᵢ [sgn wᵢτᵢ = γ] wᵢτᵢ / Σᵢ [sgn wᵢτᵢ = γ] wᵢ (``disjoint_sum``).
    """
    base = _f32(base)
    w = torch.tensor(weight, dtype=torch.float32, device=base.device)
    weighted = [_f32(delta) * wi for delta, wi in zip(deltas, w)]
    if consensus:
        mixed, divisor = disjoint_sum(weighted, w)
    else:
        mixed = total(weighted)
        divisor = on_device_of(mixed, linear_divisor(torch.tensor(weight, dtype=torch.float32)))
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed


def task_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weight: list[float],
    keep=None,
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """The whole task-arithmetic family: τᵢ = θᵢ − θ₀, τ̂ᵢ = ``sparsified(τᵢ, keep.rules[i])``
    (``keep`` None: τ̂ᵢ = τᵢ), then ``task_combine``."""
    base = _f32(base)
    deltas = [_f32(x) - base for x in tensors]
    if keep is not None:
        deltas = [sparsified(delta, rule, keep.rescale) for delta, rule in zip(deltas, keep.rules)]
    return task_combine(base, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)


# ---------------------------------------------------------------- SLERP's combine, scale, model_stock


def slerp_combine(c0: torch.Tensor | float, c1: torch.Tensor | float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c₀·a + c₁·b with float32 coefficients (two products, one sum: no fused multiply-add)."""
    return c0 * _f32(a) + c1 * _f32(b)


def scale(x: torch.Tensor, s: float | None) -> torch.Tensor:
    """s · x (x itself when s is None); s is rounded to float32."""
    x = _f32(x)
    return x if s is None else x * s


def stock_interpolate(w0: torch.Tensor, models: list[torch.Tensor], t: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """t θ̄ + (1 − t) θ₀ with θ̄ = Σᵢ θᵢ / N (summed in order from 0); t is float32 of
    shape [1] (one ratio) or w0.shape[:-1] + [1] (one per row of the last axis).

    With ``overwrite`` the float32 inputs are the caller's to overwrite: the same operations in
    place in them, the result alone in a tensor of its own (each operation is commutative, so
    the same bits with one allocation instead of six)."""
    if overwrite and all(x.dtype == torch.float32 for x in (w0, *models)):
        average = models[0].add_(0)  # 0 + θ₁, as sum() starts
        for x in models[1:]:
            average.add_(x)
        return torch.add(average.div_(on_device_of(average, len(models))).mul_(t), w0.mul_(1 - t))
    w0 = _f32(w0)
    models = [_f32(x) for x in models]
    average = sum(models) / on_device_of(w0, len(models))
    return t * average + (1 - t) * w0
