"""Fused Triton kernels for the merge methods' element-wise steps, and their launchers.

Each launcher has the signature of its reference in ``distmerge.kernels.reference`` and
computes the same values: the same float32 operations in the same order, so the result is
bitwise equal wherever the math is element-wise. That takes three things on a GPU, where
Triton would otherwise differ from torch on CPU:

- kernels are launched with ``enable_fp_fusion=False``: no multiply-add is contracted into
  an FMA behind our back (torch's CPU ``a * b + c`` rounds twice). Where the CPU rounds
  once (``addcmul_`` in ``linear``) the kernel calls ``tl.fma`` explicitly;
- divisions use ``tl.div_rn`` (IEEE), not ``/`` (``div.full.f32``, up to 2 ulp off);
- bfloat16 inputs are widened on the bits (exact, also under the Triton interpreter).

What is not element-wise is not bitwise: the L1 norms of the rescale (``masked``) are
sums over the whole tensor, reduced per block here and across blocks in float64 on the
host, in another order than torch's; the scale factor, and so the rescaled entries, can
differ from the CPU's in the last bits (relative 1e-6 in the tests).

Inputs are read in their storage dtype (float32, float16, bfloat16; each input its own),
converted inside the kernel, computed on in float32, and written once as float32.
N inputs arrive as a tuple of tensors (one specialization per N and dtypes), and each
program keeps its N weighted deltas in registers between the sign election and the
disjoint mean, so every input is read from memory once per pass.

Dropout draws for element j (the row-major flat index) are word j % 4 of
``tl.randint4x(seed, j // 4)`` made uniform (``_uniform``): the same bits as
``distmerge.rng.uniform(seed)[j]`` on CPU.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from distmerge.kernels import reference
from distmerge.kernels.keep import Band, Draw, Keep
from distmerge.kernels.reference import RESCALE_EPS

BLOCK = 1024
"""Elements per program on a GPU (with NUM_WARPS warps: 8 per thread per input)."""
NUM_WARPS = 4
KEEP_ALL, KEEP_MASK, KEEP_RANK, KEEP_RANDOM = 0, 1, 2, 3
"""Per-input keep rules (``distmerge.kernels.keep``): everything; a boolean mask; a band of
magnitude ranks given by (threshold, tie cut) pairs; a Philox draw below a probability."""


# ---------------------------------------------------------------- device helpers


@triton.jit
def _bf16_to_f32(x):
    bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _to_f32(x):
    if tl.constexpr(x.dtype == tl.bfloat16):
        return _bf16_to_f32(x)
    else:
        return x.to(tl.float32)


@triton.jit
def _load(ptr, offs, m):
    """An input as float32."""
    return _to_f32(tl.load(ptr + offs, mask=m, other=0.0))


@triton.jit
def _block_flag(idx, value):
    """A scalar integer test as a block of int1 (value != 0 in every lane). Or-ing a scalar
    int1 into a block directly is mis-broadcast by the Triton interpreter."""
    return (idx * 0 + value) != 0


@triton.jit
def _in_top(a, idx, thr, cut):
    """Whether |δ| = a is among the k largest: a > thr, or a = thr at a flat index ≤ cut (the
    ties to the lower index, as ``reference.in_top``); cut = -2 (``keep.CUT_ALL``): always."""
    return _block_flag(idx, cut == -2) | (a > thr) | ((a == thr) & (idx <= cut))


@triton.jit
def _uniform(seed, idx):
    """``distmerge.rng.uniform(seed)[idx]``: word idx % 4 of the Philox block for counter idx // 4."""
    r0, r1, r2, r3 = tl.randint4x(seed, idx // 4)
    w = idx % 4
    r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return tl.random.uint_to_uniform_float(r)


@triton.jit
def _keep(d, offs, gidx, m, masks, fpar_ptr, ipar_ptr, i: tl.constexpr, KEEP: tl.constexpr):
    """Keep rule of input i for its deltas d (float32): see the KEEP_* constants.

    Per-input parameters: fpar[i] = (weight, scale, thr_k | p, thr_skip),
    ipar[i] = (seed, cut_k, cut_skip, dense); dense = 1 keeps everything.
    """
    if KEEP == 1:
        keep = (tl.load(masks[i] + offs, mask=m, other=0) != 0) | _block_flag(offs, tl.load(ipar_ptr + 4 * i + 3))
    elif KEEP == 2:
        a = tl.abs(d)
        top = _in_top(a, offs, tl.load(fpar_ptr + 4 * i + 2), tl.load(ipar_ptr + 4 * i + 1))
        skip = _in_top(a, offs, tl.load(fpar_ptr + 4 * i + 3), tl.load(ipar_ptr + 4 * i + 2))
        keep = (top & ~skip) | _block_flag(offs, tl.load(ipar_ptr + 4 * i + 3))
    else:
        u = _uniform(tl.load(ipar_ptr + 4 * i), gidx)
        keep = (u < tl.load(fpar_ptr + 4 * i + 2)) | _block_flag(offs, tl.load(ipar_ptr + 4 * i + 3))
    return keep


# ---------------------------------------------------------------- kernels


@triton.jit
def task_merge_kernel(
    out_ptr, base_ptr, xs, masks, fpar_ptr, ipar_ptr, n, idx0, divisor, lam,
    SUB_BASE: tl.constexpr, ADD_BASE: tl.constexpr, KEEP: tl.constexpr, RESCALE: tl.constexpr,
    CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, SCALE_LAMBDA: tl.constexpr, FMA: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """[θ₀ +] λ · Σᵢ wᵢ · sᵢ · keepᵢ(τᵢ) / D, or the TIES disjoint mean, in one pass.

    τᵢ = xᵢ − θ₀ (SUB_BASE) or xᵢ (given deltas). keepᵢ per KEEP, sᵢ the rescale factor
    (RESCALE). Linear: Σ from the first weighted term, D = ``divisor`` (a host scalar); FMA:
    acc = fma(τᵢ, wᵢ, acc) from 0 instead (``addcmul_``). CONSENSUS: γ = sgn Σᵢ wᵢτᵢ
    (0 -> +1), Σᵢ [sgn wᵢτᵢ = γ] wᵢτᵢ / Σᵢ [sgn wᵢτᵢ = γ] wᵢ (divisor 0 -> 1).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    if SUB_BASE or ADD_BASE:
        b = _load(base_ptr, offs, m)
    acc = tl.zeros([BLOCK], tl.float32)
    weighted = ()
    for i in tl.static_range(len(xs)):
        d = _load(xs[i], offs, m)
        if SUB_BASE:
            d = d - b
        if KEEP != 0:
            d = tl.where(_keep(d, offs, offs + idx0, m, masks, fpar_ptr, ipar_ptr, i, KEEP), d, 0.0)
        if RESCALE:
            d = d * tl.load(fpar_ptr + 4 * i + 1)
        w = tl.load(fpar_ptr + 4 * i)
        if FMA:
            acc = tl.fma(d, w, acc)
        else:
            wd = d * w
            if CONSENSUS:
                weighted = weighted + (wd,)
            if i == 0:
                acc = wd
            else:
                acc = acc + wd
    if CONSENSUS:
        sign = tl.where(acc >= 0, 1.0, -1.0)
        mixed = tl.zeros([BLOCK], tl.float32)
        agreeing = tl.zeros([BLOCK], tl.float32)
        for i in tl.static_range(len(xs)):
            wd = weighted[i]
            agree = ((wd > 0) & (sign > 0)) | ((wd < 0) & (sign < 0))
            mixed = mixed + tl.where(agree, wd, 0.0)
            agreeing = agreeing + tl.where(agree, tl.load(fpar_ptr + 4 * i), 0.0)
        if NORMALIZE:
            mixed = tl.div_rn(mixed, tl.where(agreeing == 0, 1.0, agreeing))
    else:
        mixed = acc
        if NORMALIZE:
            mixed = tl.div_rn(mixed, divisor)
    if SCALE_LAMBDA:
        mixed = mixed * lam
    if ADD_BASE:
        mixed = b + mixed
    tl.store(out_ptr + offs, mixed, mask=m)


@triton.jit
def keep_norms_kernel(
    part_ptr, count_ptr, base_ptr, xs, masks, fpar_ptr, ipar_ptr, n, idx0, P,
    SUB_BASE: tl.constexpr, KEEP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """First pass of a rescale: per program and input, Σ|τᵢ|, Σ|keepᵢ(τᵢ)| (float32, into
    part[i, 0 | 1, program]) and the number kept (int32, into count[i, program])."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    if SUB_BASE:
        b = _load(base_ptr, offs, m)
    for i in tl.static_range(len(xs)):
        d = _load(xs[i], offs, m)
        if SUB_BASE:
            d = d - b
        a = tl.abs(d)
        if KEEP != 0:
            keep = _keep(d, offs, offs + idx0, m, masks, fpar_ptr, ipar_ptr, i, KEEP) & m
        else:
            keep = m
        tl.store(part_ptr + (2 * i) * P + pid, tl.sum(a, axis=0))
        tl.store(part_ptr + (2 * i + 1) * P + pid, tl.sum(tl.where(keep, a, 0.0), axis=0))
        tl.store(count_ptr + i * P + pid, tl.sum(keep.to(tl.int32), axis=0))


@triton.jit
def lerp2_kernel(out_ptr, a_ptr, b_ptr, n, c0, c1, BLOCK: tl.constexpr):
    """c₀·a + c₁·b (SLERP after its reductions; its LERP fallback with c₀ = 1 − t)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, c0 * _load(a_ptr, offs, m) + c1 * _load(b_ptr, offs, m), mask=m)


@triton.jit
def scale_kernel(out_ptr, x_ptr, n, s, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """s·x (passthrough)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = _load(x_ptr, offs, m)
    if HAS_SCALE:
        x = x * s
    tl.store(out_ptr + offs, x, mask=m)


@triton.jit
def stock_kernel(
    out_ptr, base_ptr, xs, t_ptr, n, cols, count,
    PER_ROW: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """t·(Σᵢ θᵢ / N) + (1 − t)·θ₀, t one float32 or one per row of ``cols`` entries (model_stock)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    total = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(len(xs)):
        total = total + _load(xs[i], offs, m)
    average = tl.div_rn(total, count)
    if PER_ROW:
        t = tl.load(t_ptr + offs // cols, mask=m, other=0.0)
    else:
        t = tl.load(t_ptr)
    b = _load(base_ptr, offs, m)
    tl.store(out_ptr + offs, t * average + (1.0 - t) * b, mask=m)


# ---------------------------------------------------------------- launchers


def _launch(kernel, n: int, block: int | None, out: torch.Tensor, *args, **constexprs) -> None:
    """kernel[programs](out, *args) on ``out``'s device (Triton launches on the current one)."""
    block = block or BLOCK
    grid = (triton.cdiv(n, block),)
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        kernel[grid](out, *args, BLOCK=block, num_warps=NUM_WARPS, enable_fp_fusion=False, **constexprs)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """Row-major contiguous: flat index j is the element the draws and tie cuts refer to."""
    return x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)


def _empty_out(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=torch.float32, device=like.device)


class _Plan:
    """Per-input parameters of the fused kernels: fpar (N, 4) float32 = (weight, scale,
    thr_k | p, thr_skip), ipar (N, 4) int64 = (seed, cut_k, cut_skip, dense)."""

    def __init__(self, weight: list[float]):
        count = len(weight)
        self.fpar = torch.zeros(count, 4, dtype=torch.float32)
        self.fpar[:, 0] = torch.tensor(weight, dtype=torch.float32)
        self.fpar[:, 1] = 1.0
        self.ipar = torch.zeros(count, 4, dtype=torch.int64)
        self.keep = KEEP_ALL
        self.masks: tuple[torch.Tensor, ...] | None = None
        self.rescale = [False] * count

    def dense(self, i: int) -> None:
        self.ipar[i, 3] = 1


def _keep_plan(plan: _Plan, keep: Keep, n: int, device) -> None:
    """Fill ``plan`` from the methods' decision: a ``Keep`` of bands, draws or masks."""
    kind = keep.kind()
    plan.keep = {Band: KEEP_RANK, Draw: KEEP_RANDOM, torch.Tensor: KEEP_MASK, None: KEEP_ALL}[kind]
    masks = []
    for i, rule in enumerate(keep.rules):
        if rule is None:
            plan.dense(i)
            masks.append(torch.ones(n, dtype=torch.bool, device=device) if kind is torch.Tensor else None)
            continue
        plan.rescale[i] = keep.rescale
        if isinstance(rule, Band):
            plan.fpar[i, 2], plan.ipar[i, 1] = rule.top.threshold, rule.top.cut
            plan.fpar[i, 3], plan.ipar[i, 2] = rule.skip.threshold, rule.skip.cut
        elif isinstance(rule, Draw):
            if not 0 <= rule.seed < 1 << 64:
                raise ValueError(f"Philox key must be in [0, 2**64), got {rule.seed}")
            plan.ipar[i, 0] = rule.seed - (1 << 64) if rule.seed >= 1 << 63 else rule.seed
            plan.fpar[i, 2] = rule.p
        else:
            masks.append(_flat(rule.to(device=device, dtype=torch.bool)))
    if kind is torch.Tensor:
        plan.masks = tuple(masks)
    elif bool(plan.ipar[:, 3].all()):
        plan.keep = KEEP_ALL  # every rule None: nothing to select or draw


def keep_norms(
    base: torch.Tensor | None,
    xs: tuple[torch.Tensor, ...],
    plan: _Plan,
    *,
    idx0: int = 0,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ|τᵢ|, Σ|keepᵢ(τᵢ)|) as float32 and the kept counts as int64, one per input."""
    n = xs[0].numel()
    block = block or BLOCK
    programs = triton.cdiv(n, block)
    device = xs[0].device
    partial = torch.empty(len(xs), 2, programs, dtype=torch.float32, device=device)
    counts = torch.empty(len(xs), programs, dtype=torch.int32, device=device)
    _launch(
        keep_norms_kernel, n, block, partial, counts, base, xs, plan.masks,
        plan.fpar.to(device), plan.ipar.to(device), n, idx0, programs,
        SUB_BASE=base is not None, KEEP=plan.keep,
    )  # fmt: skip
    sums = partial.to(torch.float64).sum(-1).to(torch.float32)
    return sums[:, 0], sums[:, 1], counts.to(torch.int64).sum(-1)


def _apply_rescale(plan: _Plan, base, xs, *, block=None) -> None:
    """Scale factors ‖τᵢ‖₁ / ‖keepᵢ(τᵢ)‖₁ (1 when either is below RESCALE_EPS), as ``reference.masked``."""
    if not any(plan.rescale):
        return
    before, after, _ = keep_norms(base, xs, plan, block=block)
    ratio = torch.where((before < RESCALE_EPS) | (after < RESCALE_EPS), 1.0, before / after)
    wanted = torch.tensor(plan.rescale, device=ratio.device)
    plan.fpar[:, 1] = torch.where(wanted, ratio, 1.0).cpu()


def _merge_launch(
    out, base, xs, plan: _Plan, *, sub_base, add_base, consensus, normalize, lambda_, fma=False, divisor=1.0,
    idx0=0, block=None,
) -> torch.Tensor:  # fmt: skip
    n = out.numel()
    _launch(
        task_merge_kernel, n, block, out.view(-1), base, xs, plan.masks,
        plan.fpar.to(out.device), plan.ipar.to(out.device), n, idx0, float(divisor), float(lambda_),
        SUB_BASE=sub_base, ADD_BASE=add_base, KEEP=plan.keep, RESCALE=any(plan.rescale), CONSENSUS=consensus,
        NORMALIZE=normalize, SCALE_LAMBDA=lambda_ != 1, FMA=fma,
    )  # fmt: skip
    return out


def _linear_divisor(weight: list[float]) -> float:
    return float(reference.linear_divisor(torch.tensor(weight, dtype=torch.float32)))


# ---------------------------------------------------------------- the public launchers


def linear_sum(tensors, weight, *, normalize, block=None):
    """``reference.linear_sum`` in one pass."""
    if tensors[0].numel() == 0:
        return reference.linear_sum(tensors, weight, normalize=normalize)
    xs = tuple(_flat(x) for x in tensors)
    out = _empty_out(tensors[0])
    divisor = float(torch.tensor(weight, dtype=torch.float32).sum())
    return _merge_launch(
        out, None, xs, _Plan(weight), sub_base=False, add_base=False, consensus=False, normalize=normalize,
        lambda_=1.0, fma=True, divisor=divisor, block=block,
    )  # fmt: skip


def task_combine(base, deltas, weight, *, consensus, normalize, lambda_, block=None):
    """``reference.task_combine`` in one pass over the given task vectors."""
    if base.numel() == 0:
        return reference.task_combine(base, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)
    return _merge_launch(
        _empty_out(base), _flat(base), tuple(_flat(d) for d in deltas), _Plan(weight), sub_base=False,
        add_base=True, consensus=consensus, normalize=normalize, lambda_=lambda_, divisor=_linear_divisor(weight),
        block=block,
    )  # fmt: skip


def task_merge(base, tensors, weight, keep: Keep | None = None, *, consensus, normalize, lambda_, block=None):
    """``reference.task_merge``: task vectors, what ``keep`` keeps of them and their combination in
    one pass over the models (two with a rescale: its norms first)."""
    n = base.numel()
    options = dict(consensus=consensus, normalize=normalize, lambda_=lambda_)
    if n == 0 or not tensors:
        return reference.task_merge(base, tensors, weight, keep, **options)
    b, xs = _flat(base), tuple(_flat(x) for x in tensors)
    plan = _Plan(weight)
    if keep is not None:
        _keep_plan(plan, keep, n, base.device)
        _apply_rescale(plan, b, xs, block=block)
    return _merge_launch(
        _empty_out(base), b, xs, plan, sub_base=True, add_base=True, divisor=_linear_divisor(weight), block=block,
        **options,
    )  # fmt: skip


def _scalar(c) -> float:
    """A float32 coefficient as the Python float holding the same value."""
    return float(torch.as_tensor(c, dtype=torch.float32))


def slerp_combine(c0, c1, a, b, *, block=None):
    """``reference.slerp_combine``: c₀·a + c₁·b."""
    out = _empty_out(a)
    if a.numel():
        _launch(lerp2_kernel, a.numel(), block, out.view(-1), _flat(a), _flat(b), a.numel(), _scalar(c0), _scalar(c1))
    return out


def scale(x, s, *, block=None):
    """``reference.scale``: s·x."""
    out = _empty_out(x)
    if x.numel():
        _launch(
            scale_kernel, x.numel(), block, out.view(-1), _flat(x), x.numel(), 1.0 if s is None else _scalar(s),
            HAS_SCALE=s is not None,
        )  # fmt: skip
    return out


def stock_interpolate(w0, models, t, *, block=None):
    """``reference.stock_interpolate``: t·mean(θᵢ) + (1 − t)·θ₀ in one pass."""
    out = _empty_out(w0)
    n = w0.numel()
    if n:
        t = _flat(t.to(device=w0.device, dtype=torch.float32))
        per_row = t.numel() != 1
        cols = w0.shape[-1] if per_row else 1
        if per_row and t.numel() * cols != n:
            raise ValueError(f"t has {t.numel()} entries for {n // cols} rows")
        _launch(
            stock_kernel, n, block, out.view(-1), _flat(w0), tuple(_flat(x) for x in models), t, n, cols,
            float(len(models)), PER_ROW=per_row,
        )  # fmt: skip
    return out
