"""Fused Triton kernels for the merge methods' element-wise steps, and their launchers.

Each launcher has the signature of its reference in ``distmerge.kernels.reference`` and
computes the same values: the same float32 operations in the same order, so the result is
bitwise equal wherever the math is element-wise. That takes three things on a GPU, where
Triton would otherwise differ from torch on CPU:

- kernels are launched with ``enable_fp_fusion=False``: no multiply-add is contracted into
  an FMA behind our back (torch's CPU ``a * b + c`` rounds twice). Where the CPU rounds
  once (``addcmul_`` in ``linear``) the kernel calls ``tl.fma`` explicitly;
- divisions use ``tl.div_rn`` (IEEE), not ``/`` (``div.full.f32``, up to 2 ulp off);
- float32 <-> bfloat16 conversions are done on the bits (round to nearest even, NaN ->
  0x7FC0, as c10::BFloat16), which also makes them exact under the Triton interpreter,
  whose own bfloat16 conversion is not.

What is not element-wise is not bitwise: the L1 norms of the rescale (``masked``) are
sums over the whole tensor, reduced per block here and across blocks in float64 on the
host, in another order than torch's; the scale factor, and so the rescaled entries, can
differ from the CPU's in the last bits (relative 1e-6 in the tests).

Inputs are read in their storage dtype (float32, float16, bfloat16; each input its own),
converted inside the kernel, computed on in float32, and written once in the output dtype.
N inputs arrive as a tuple of tensors (one specialization per N and dtypes), and each
program keeps its N weighted deltas in registers between the sign election and the
disjoint mean, so every input is read from memory once per pass.

Dropout draws for element j (the row-major flat index) are word j % 4 of
``tl.randint4x(seed, j // 4)`` made uniform (``_uniform``): the same bits as
``distmerge.rng.uniform(seed)[j]`` on CPU.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

BLOCK = 1024
"""Elements per program on a GPU (with NUM_WARPS warps: 8 per thread per input)."""
NUM_WARPS = 4
RESCALE_EPS = 1e-7
"""As ``sparsify.RESCALE_EPS``: below this L1 norm (before or after) no rescale."""

KEEP_ALL, KEEP_MASK, KEEP_RANK, KEEP_RANDOM = 0, 1, 2, 3
"""Per-input keep rules: everything; a boolean mask; a band of magnitude ranks given by
(threshold, tie cut) pairs; a Philox draw below a probability."""
CUT_ALL, CUT_NONE = -2, -1
"""Tie cuts meaning "every entry is in the top k" (k ≥ n) and "none is" (k ≤ 0)."""

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ---------------------------------------------------------------- device helpers


@triton.jit
def _bf16_to_f32(x):
    bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16(x):
    """Round to nearest even on the bits, NaN -> 0x7FC0 (c10::BFloat16's rule)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _to_f32(x):
    if tl.constexpr(x.dtype == tl.bfloat16):
        return _bf16_to_f32(x)
    else:
        return x.to(tl.float32)


@triton.jit
def _from_f32(x, DT: tl.constexpr):
    if tl.constexpr(DT == tl.bfloat16):
        return _f32_to_bf16(x)
    elif tl.constexpr(DT == tl.float32):
        return x
    else:
        return x.to(DT)


@triton.jit
def _load(ptr, offs, m, ROUND: tl.constexpr):
    """An input as float32, rounded first to ROUND (the recipe dtype) when given."""
    raw = tl.load(ptr + offs, mask=m, other=0.0)
    x = _to_f32(raw)
    if ROUND is not None:
        if tl.constexpr(raw.dtype != ROUND):
            x = _to_f32(_from_f32(x, ROUND))
    return x


@triton.jit
def _store(ptr, offs, m, y, WORK: tl.constexpr):
    """Round the float32 result to WORK (when given), then to the output's dtype."""
    if WORK is not None:
        y = _to_f32(_from_f32(y, WORK))
    tl.store(ptr + offs, _from_f32(y, ptr.dtype.element_ty), mask=m)


@triton.jit
def _block_flag(idx, value):
    """A scalar integer test as a block of int1 (value != 0 in every lane). Or-ing a scalar
    int1 into a block directly is mis-broadcast by the Triton interpreter."""
    return (idx * 0 + value) != 0


@triton.jit
def _in_top(a, idx, thr, cut):
    """Whether |δ| = a is among the k largest: a > thr, or a = thr at a flat index ≤ cut (the
    ties to the lower index, as ``sparsify.top_k_mask``); cut = CUT_ALL: always."""
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
        keep = tl.load(masks[i] + offs, mask=m, other=0) != 0
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
    ROUND_X: tl.constexpr, ROUND_B: tl.constexpr, WORK: tl.constexpr, BLOCK: tl.constexpr,
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
        b = _load(base_ptr, offs, m, ROUND_B)
    acc = tl.zeros([BLOCK], tl.float32)
    weighted = ()
    for i in tl.static_range(len(xs)):
        d = _load(xs[i], offs, m, ROUND_X)
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
    _store(out_ptr, offs, m, mixed, WORK)


@triton.jit
def keep_norms_kernel(
    part_ptr, count_ptr, base_ptr, xs, masks, fpar_ptr, ipar_ptr, n, idx0, P,
    SUB_BASE: tl.constexpr, KEEP: tl.constexpr, ROUND_X: tl.constexpr, ROUND_B: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """First pass of a rescale: per program and input, Σ|τᵢ|, Σ|keepᵢ(τᵢ)| (float32, into
    part[i, 0 | 1, program]) and the number kept (int32, into count[i, program])."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    if SUB_BASE:
        b = _load(base_ptr, offs, m, ROUND_B)
    for i in tl.static_range(len(xs)):
        d = _load(xs[i], offs, m, ROUND_X)
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
def lerp2_kernel(out_ptr, a_ptr, b_ptr, n, c0, c1, ROUND: tl.constexpr, WORK: tl.constexpr, BLOCK: tl.constexpr):
    """c₀·a + c₁·b (SLERP after its reductions; its LERP fallback with c₀ = 1 − t)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = _load(a_ptr, offs, m, ROUND)
    b = _load(b_ptr, offs, m, ROUND)
    _store(out_ptr, offs, m, c0 * a + c1 * b, WORK)


@triton.jit
def scale_kernel(
    out_ptr, x_ptr, n, s, HAS_SCALE: tl.constexpr, ROUND: tl.constexpr, WORK: tl.constexpr, BLOCK: tl.constexpr
):
    """s·x with the casts (passthrough)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = _load(x_ptr, offs, m, ROUND)
    if HAS_SCALE:
        x = x * s
    _store(out_ptr, offs, m, x, WORK)


@triton.jit
def stock_kernel(
    out_ptr, base_ptr, xs, t_ptr, n, cols, count,
    PER_ROW: tl.constexpr, ROUND: tl.constexpr, WORK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """t·(Σᵢ θᵢ / N) + (1 − t)·θ₀, t one float32 or one per row of ``cols`` entries (model_stock)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    total = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(len(xs)):
        total = total + _load(xs[i], offs, m, ROUND)
    average = tl.div_rn(total, count)
    if PER_ROW:
        t = tl.load(t_ptr + offs // cols, mask=m, other=0.0)
    else:
        t = tl.load(t_ptr)
    b = _load(base_ptr, offs, m, ROUND)
    _store(out_ptr, offs, m, t * average + (1.0 - t) * b, WORK)


# ---------------------------------------------------------------- launchers


def _launch(kernel, n: int, block: int | None, out: torch.Tensor, *args, **constexprs) -> None:
    """kernel[programs](out, *args) on ``out``'s device (Triton launches on the current one)."""
    block = block or BLOCK
    grid = (triton.cdiv(n, block),)
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        kernel[grid](out, *args, BLOCK=block, num_warps=NUM_WARPS, enable_fp_fusion=False, **constexprs)


def _tl(dtype: torch.dtype | None):
    if dtype is None:
        return None
    if dtype not in _TL_DTYPES:
        raise TypeError(f"no Triton kernel for dtype {dtype}")
    return _TL_DTYPES[dtype]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """Row-major contiguous: flat index j is the element the draws and tie cuts refer to."""
    return x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)


def _empty_out(like: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor:
    return torch.empty(like.shape, dtype=out_dtype or torch.float32, device=like.device)


def _rounded(x: torch.Tensor, work_dtype: torch.dtype | None) -> torch.Tensor:
    if work_dtype is not None:
        x = x.to(work_dtype)
    return x.to(torch.float32)


def rank_cut(score: torch.Tensor, k: int) -> tuple[float, int]:
    """(threshold, tie cut) such that ``_in_top`` selects exactly ``sparsify.top_k_mask(score, k)``:
    the k largest of a flat non-negative float32 tensor, ties to the lower flat index."""
    from distmerge.methods.sparsify import _index_of_nth_true, kth_largest

    n = score.numel()
    if k >= n:
        return -math.inf, CUT_ALL
    if k <= 0:
        return math.inf, CUT_NONE
    threshold = kth_largest(score, k)
    wanted = k - int((score > threshold).sum())
    ties = score == threshold
    cut = _index_of_nth_true(ties, wanted) if int(ties.sum()) > wanted else n
    return float(threshold), cut


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

    def band(self, i: int, magnitudes: torch.Tensor, skip: int, k: int) -> None:
        """Keep the entries of magnitude rank skip .. skip+k−1 (0 = largest)."""
        self.fpar[i, 2], self.ipar[i, 1] = rank_cut(magnitudes, skip + k)
        self.fpar[i, 3], self.ipar[i, 2] = rank_cut(magnitudes, skip)


def _keep_plan(plan: _Plan, sparsifier, deltas_of, n: int, device) -> None:
    """Fill ``plan`` from a kernels sparsifier, as ``distmerge.methods.sparsify`` decides."""
    from distmerge.kernels.sparsifiers import Masked, Outliers, RandomDrop, TopK

    if isinstance(sparsifier, (TopK, Outliers)):
        plan.keep = KEEP_RANK
        for i in range(len(plan.rescale)):
            density = sparsifier.density[i]
            if density >= 1:
                plan.dense(i)
                continue
            if isinstance(sparsifier, TopK):  # sparsify.magnitude
                if density <= 0 or n == 0:  # zeros: nothing is in the top band
                    plan.fpar[i, 2], plan.ipar[i, 1] = math.inf, CUT_NONE
                    plan.fpar[i, 3], plan.ipar[i, 2] = math.inf, CUT_NONE
                    continue
                skip, k = 0, max(1, int(density * n))
            else:  # sparsify.magnitude_outliers
                target = max(0, int(density * n))
                skip = n - max(0, n - target - int(sparsifier.gamma[i] * n)) - target
                k = target
            plan.band(i, deltas_of(i).abs_(), skip, k)
            plan.rescale[i] = sparsifier.rescale
    elif isinstance(sparsifier, RandomDrop):  # sparsify.random
        plan.keep = KEEP_RANDOM
        for i, (density, seed) in enumerate(zip(sparsifier.density, sparsifier.seeds)):
            if density >= 1:
                plan.dense(i)
                continue
            if not 0 <= seed < 1 << 64:
                raise ValueError(f"Philox key must be in [0, 2**64), got {seed}")
            plan.ipar[i, 0] = seed - (1 << 64) if seed >= 1 << 63 else seed
            plan.fpar[i, 2] = density
            plan.rescale[i] = sparsifier.rescale
    elif isinstance(sparsifier, Masked):  # sparsify.masked
        plan.keep = KEEP_MASK
        plan.masks = tuple(_flat(mask.to(device=device, dtype=torch.bool)) for mask in sparsifier.masks)
        plan.rescale = [sparsifier.rescale] * len(plan.rescale)
    else:
        raise TypeError(f"not a kernels sparsifier: {sparsifier!r}")
    if plan.keep in (KEEP_RANK, KEEP_RANDOM) and bool(plan.ipar[:, 3].all()):
        plan.keep = KEEP_ALL  # every density ≥ 1: nothing to select or draw


def keep_norms(
    base: torch.Tensor | None,
    xs: tuple[torch.Tensor, ...],
    plan: _Plan,
    *,
    idx0: int = 0,
    round_x=None,
    round_b=None,
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
        SUB_BASE=base is not None, KEEP=plan.keep, ROUND_X=round_x, ROUND_B=round_b,
    )  # fmt: skip
    sums = partial.to(torch.float64).sum(-1).to(torch.float32)
    return sums[:, 0], sums[:, 1], counts.to(torch.int64).sum(-1)


def _apply_rescale(plan: _Plan, base, xs, *, idx0=0, round_x=None, round_b=None, block=None) -> None:
    """Scale factors ‖τᵢ‖₁ / ‖keepᵢ(τᵢ)‖₁ (1 when either is below 1e-7), as ``sparsify.masked``."""
    if not any(plan.rescale):
        return
    before, after, _ = keep_norms(base, xs, plan, idx0=idx0, round_x=round_x, round_b=round_b, block=block)
    ratio = torch.where((before < RESCALE_EPS) | (after < RESCALE_EPS), 1.0, before / after)
    wanted = torch.tensor(plan.rescale, device=ratio.device)
    plan.fpar[:, 1] = torch.where(wanted, ratio, 1.0).cpu()


def _merge_launch(
    out, base, xs, plan: _Plan, *, sub_base, add_base, consensus, normalize, lambda_, fma=False, divisor=1.0,
    idx0=0, round_x=None, round_b=None, work=None, block=None,
) -> torch.Tensor:  # fmt: skip
    n = out.numel()
    _launch(
        task_merge_kernel, n, block, out.view(-1), base, xs, plan.masks,
        plan.fpar.to(out.device), plan.ipar.to(out.device), n, idx0, float(divisor), float(lambda_),
        SUB_BASE=sub_base, ADD_BASE=add_base, KEEP=plan.keep, RESCALE=any(plan.rescale), CONSENSUS=consensus,
        NORMALIZE=normalize, SCALE_LAMBDA=lambda_ != 1, FMA=fma, ROUND_X=round_x, ROUND_B=round_b, WORK=work,
    )  # fmt: skip
    return out


def _linear_divisor(weight: list[float]) -> float:
    divisor = torch.tensor(weight, dtype=torch.float32).sum()
    return 1.0 if divisor.abs() < 1e-8 else float(divisor)


# ---------------------------------------------------------------- the public launchers


def linear_sum(tensors, weight, *, normalize, work_dtype=None, out_dtype=None, block=None):
    """``reference.linear_sum`` in one pass."""
    from distmerge.kernels import reference

    if tensors[0].numel() == 0:
        return reference.linear_sum(tensors, weight, normalize=normalize, work_dtype=work_dtype, out_dtype=out_dtype)
    xs = tuple(_flat(x) for x in tensors)
    out = _empty_out(tensors[0], out_dtype)
    divisor = float(torch.tensor(weight, dtype=torch.float32).sum())
    return _merge_launch(
        out, None, xs, _Plan(weight), sub_base=False, add_base=False, consensus=False, normalize=normalize,
        lambda_=1.0, fma=True, divisor=divisor, round_x=_tl(work_dtype), work=_tl(work_dtype), block=block,
    )  # fmt: skip


def task_combine(base, deltas, weight, *, consensus, normalize, lambda_, work_dtype=None, out_dtype=None, block=None):
    """``reference.task_combine`` in one pass over the given task vectors."""
    from distmerge.kernels import reference

    if base.numel() == 0:
        return reference.task_combine(
            base, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_,
            work_dtype=work_dtype, out_dtype=out_dtype,
        )  # fmt: skip
    out = _empty_out(base, out_dtype)
    return _merge_launch(
        out, _flat(base), tuple(_flat(d) for d in deltas), _Plan(weight), sub_base=False, add_base=True,
        consensus=consensus, normalize=normalize, lambda_=lambda_, divisor=_linear_divisor(weight),
        round_b=_tl(work_dtype), work=_tl(work_dtype), block=block,
    )  # fmt: skip


def task_merge(
    base, tensors, weight, sparsifier=None, *, consensus, normalize, lambda_, work_dtype=None, out_dtype=None,
    block=None,
):  # fmt: skip
    """``reference.task_merge``: task vectors, sparsification and combination in one pass over
    the models (two with a rescale: its norms first), for the ``kernels.sparsifiers``; any
    other sparsifier callable runs in torch and only the combination is fused."""
    from distmerge.kernels import reference
    from distmerge.kernels.sparsifiers import Masked, Outliers, RandomDrop, TopK

    n = base.numel()
    if n == 0 or not tensors:
        return reference.task_merge(
            base, tensors, weight, sparsifier, consensus=consensus, normalize=normalize, lambda_=lambda_,
            work_dtype=work_dtype, out_dtype=out_dtype,
        )  # fmt: skip
    options = dict(consensus=consensus, normalize=normalize, lambda_=lambda_, divisor=_linear_divisor(weight))
    rb, rx, work = _tl(work_dtype), _tl(work_dtype), _tl(work_dtype)
    b, xs = _flat(base), tuple(_flat(x) for x in tensors)
    out = _empty_out(base, out_dtype)
    plan = _Plan(weight)
    if sparsifier is not None and not isinstance(sparsifier, (TopK, Outliers, RandomDrop, Masked)):
        # Not one the kernel knows: materialize τ̂ᵢ with torch, fuse the combination.
        b32 = _rounded(base, work_dtype)  # in its shape: a sparsifier may work along an axis
        deltas = tuple(_flat(sparsifier(i, _rounded(x, work_dtype) - b32)) for i, x in enumerate(tensors))
        return _merge_launch(
            out, b, deltas, plan, sub_base=False, add_base=True, round_b=rb, work=work, block=block, **options
        )
    if sparsifier is not None:
        b32 = _rounded(b, work_dtype) if isinstance(sparsifier, (TopK, Outliers)) else None
        _keep_plan(plan, sparsifier, lambda i: _rounded(xs[i], work_dtype) - b32, n, base.device)
        _apply_rescale(plan, b, xs, round_x=rx, round_b=rb, block=block)
    return _merge_launch(
        out, b, xs, plan, sub_base=True, add_base=True, round_x=rx, round_b=rb, work=work, block=block, **options
    )


def dare_drop(delta, density, seed, rescale=True, *, offset=0, out_dtype=None, block=None):
    """``reference.dare_drop``: pass 1 the two L1 norms (with the draws), pass 2 the masked,
    rescaled delta; both draw ``rng.uniform(seed)[offset + j]`` for element j (``_uniform``)."""
    from distmerge.kernels import reference
    from distmerge.kernels.sparsifiers import RandomDrop

    if density >= 1 or delta.numel() == 0:
        return reference.dare_drop(delta, density, seed, rescale, offset=offset, out_dtype=out_dtype)
    plan = _Plan([1.0])
    _keep_plan(plan, RandomDrop([density], [seed], rescale), None, delta.numel(), delta.device)
    xs = (_flat(delta),)
    _apply_rescale(plan, None, xs, idx0=offset, block=block)
    out = _empty_out(delta, out_dtype)
    return _merge_launch(
        out, None, xs, plan, sub_base=False, add_base=False, consensus=False, normalize=False, lambda_=1.0,
        idx0=offset, block=block,
    )  # fmt: skip


def _scalar(c) -> float:
    """A float32 coefficient as the Python float holding the same value."""
    return float(torch.as_tensor(c, dtype=torch.float32))


def slerp_combine(c0, c1, a, b, *, work_dtype=None, out_dtype=None, block=None):
    """``reference.slerp_combine``: c₀·a + c₁·b."""
    out = _empty_out(a, out_dtype)
    if a.numel():
        _launch(
            lerp2_kernel, a.numel(), block, out.view(-1), _flat(a), _flat(b), a.numel(), _scalar(c0), _scalar(c1),
            ROUND=_tl(work_dtype), WORK=_tl(work_dtype),
        )  # fmt: skip
    return out


def scale(x, s, *, work_dtype=None, out_dtype=None, block=None):
    """``reference.scale``: s·x with the casts."""
    out = _empty_out(x, out_dtype)
    if x.numel():
        _launch(
            scale_kernel, x.numel(), block, out.view(-1), _flat(x), x.numel(), 1.0 if s is None else _scalar(s),
            HAS_SCALE=s is not None, ROUND=_tl(work_dtype), WORK=_tl(work_dtype),
        )  # fmt: skip
    return out


def stock_interpolate(w0, models, t, *, work_dtype=None, out_dtype=None, block=None):
    """``reference.stock_interpolate``: t·mean(θᵢ) + (1 − t)·θ₀ in one pass."""
    out = _empty_out(w0, out_dtype)
    n = w0.numel()
    if n:
        t = _flat(t.to(device=w0.device, dtype=torch.float32))
        per_row = t.numel() != 1
        cols = w0.shape[-1] if per_row else 1
        if per_row and t.numel() * cols != n:
            raise ValueError(f"t has {t.numel()} entries for {n // cols} rows")
        _launch(
            stock_kernel, n, block, out.view(-1), _flat(w0), tuple(_flat(x) for x in models), t, n, cols,
            float(len(models)), PER_ROW=per_row, ROUND=_tl(work_dtype), WORK=_tl(work_dtype),
        )  # fmt: skip
    return out
