"""Fused element-wise steps of the merge methods: Triton kernels on CUDA, plain torch elsewhere.

A leaf package: it imports torch, triton and ``distmerge.rng``, never the methods. The methods
decide what to compute (which entries to keep, the weights, the coefficients) and hand it
over as data; the functions here only compute it.

Each function has a plain-torch reference in ``distmerge.kernels.reference`` (the methods'
math, operation for operation), a Triton launcher of the same signature in
``distmerge.kernels.triton_kernels``, and on CPU a fused loop compiled by torch.compile from
the same operations (``distmerge.kernels.compiled``). Which one runs is decided per call from
the tensor and the run's ``KernelOptions``: the kernel for a CUDA tensor when triton imports,
the compiled loop for a large CPU tensor when compiling repays, the reference otherwise. They
compute the same float32 operations in the same order (see ``triton_kernels`` for what is
and is not bitwise). Inputs may be stored in float32, float16 or bfloat16; results are float32.

==================  ============================================================  ==============
function            computes                                                      used by
==================  ============================================================  ==============
linear_sum          Σᵢ wᵢθᵢ (/ Σᵢ wᵢ), FMA-accumulated like ``addcmul_``             linear
                    (``linear_sum_into``: rounded into the output, numba's loop)
task_combine        θ₀ + λ·Σᵢ wᵢτᵢ / D, or TIES: sign election + disjoint mean     chunked merges
task_merge          the same from the models: τᵢ = θᵢ − θ₀, sparsified inside the    task-arithmetic
                    kernel by a ``Keep`` (magnitude band, DARE draw, mask) with     family
                    the L1 rescale's norms in a first pass
slerp_combine       c₀·a + c₁·b                                                     slerp
scale               s·x                                                             passthrough
stock_interpolate   t·mean(θᵢ) + (1 − t)·θ₀                                          model_stock
==================  ============================================================  ==============
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import warnings
from typing import Literal

import torch

from distmerge.kernels import compiled, reference
from distmerge.kernels.keep import ALL, NONE, Band, Draw, Keep, Rule, Top

__all__ = [
    "ALL",
    "NONE",
    "Band",
    "Draw",
    "KernelOptions",
    "Keep",
    "Rule",
    "Top",
    "kernel_name",
    "linear_sum",
    "linear_sum_into",
    "path",
    "scale",
    "slerp_combine",
    "stock_interpolate",
    "task_combine",
    "task_merge",
    "task_merge_into",
    "loops_available",
    "loops_for",
    "loops_module",
    "triton_available",
    "use_loops",
    "use_triton",
]

_OFF = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class KernelOptions:
    """How the fused steps run: decided once per run (``RunOptions.kernels``) and passed to
    every call. The defaults are what a method called directly gets."""

    compile: Literal["auto", "always", "never"] = "auto"
    """CPU: run the steps as loops compiled by torch.compile (``compiled``): "always",
    "never", or "auto": when ``work`` is large enough to repay compiling. "never" also keeps
    the chunked passes over bf16 inputs on torch ops instead of numba's loops (``use_loops``)."""
    triton: bool = True
    """CUDA: run the Triton kernels when triton imports (False: the torch references; a
    debugging switch)."""
    work: int = 0
    """Elements this rank is about to merge (``for_work``): what "auto" weighs."""
    disabled: frozenset[str] = frozenset()
    """CUDA: the kernels (``selfcheck.KERNELS`` names) that failed the run's start-up check
    against their references on its device (``selfcheck.check``): they run the torch references."""

    @classmethod
    def from_env(cls, environ=os.environ) -> KernelOptions:
        """The defaults a run takes from its environment: ``DISTMERGE_COMPILE`` (``auto``,
        ``1`` always, ``0`` never) and ``DISTMERGE_NO_TRITON=1`` (the torch references on CUDA)."""
        mode = environ.get("DISTMERGE_COMPILE", "auto").strip().lower()
        compile = "auto" if mode in ("", "auto") else "never" if mode in _OFF else "always"
        no_triton = environ.get("DISTMERGE_NO_TRITON", "0").strip().lower() not in ("", *_OFF)
        return cls(compile=compile, triton=not no_triton)

    def for_work(self, elements: int) -> KernelOptions:
        """These options for a rank that merges ``elements`` elements in all."""
        return dataclasses.replace(self, work=elements)


DEFAULT = KernelOptions()


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works here (checked once per process)."""
    try:
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install failing at import time
        return False
    return True


@functools.cache
def loops_available() -> bool:
    """Whether ``kernels.loops`` imports here (checked once per process): numba installed,
    built for this numpy, and a place to cache its compiled loops (the package's
    ``__pycache__`` or numba's cache directory: ``NUMBA_CACHE_DIR``)."""
    try:
        importlib.import_module("distmerge.kernels.loops")
    except Exception as e:  # ImportError, numba failing at import time, or no cache locator
        if not isinstance(e, ImportError):
            warnings.warn(f"distmerge: numba's loops unavailable ({type(e).__name__}: {str(e)[:200]}); merging with torch ops")
        return False
    return True


def use_loops(options: KernelOptions | None) -> bool:
    """Whether chunked passes over bf16 inputs (linear, the task-arithmetic family, sce,
    model_stock) run as ``kernels.loops``: when numba imports, unless compiled code is off
    (``KernelOptions.compile`` "never")."""
    return (options or DEFAULT).compile != "never" and loops_available()


def loops_module():
    """``kernels.loops``, imported on first use (it needs numba: check ``loops_available``)."""
    from distmerge.kernels import loops

    return loops


def loops_for(base, tensors: list) -> object | None:
    """``kernels.loops`` where these chunks, as stored, take its loops (numba imports, and they
    are bf16 on CPU: ``loops.eligible``), else None. Whether a run wants them at all is
    ``use_loops``'s answer, the caller's to ask first."""
    if not loops_available():
        return None
    loops = loops_module()
    return loops if loops.eligible(base, tensors) else None


def use_triton(tensor) -> bool:
    """True for a CUDA tensor when triton is importable."""
    return getattr(tensor, "is_cuda", False) and triton_available()


def kernel_name(keep: Keep | None) -> str:
    """The name of the ``task_merge`` kernel for a keep decision, as ``selfcheck`` checks it:
    "task_merge", or "task_merge/band", "/draw", "/mask" for one kind of rule."""
    kinds = {torch.Tensor if isinstance(r, torch.Tensor) else type(r) for r in keep.rules if r is not None} if keep else ()
    names = {Band: "band", Draw: "draw", torch.Tensor: "mask"}
    return f"task_merge/{names[next(iter(kinds))]}" if len(kinds) == 1 else "task_merge"


def path(kernel: str, device: str, options: KernelOptions | None = None, consensus: bool = False) -> str:
    """Which implementation runs ``kernel`` for a large tensor on ``device`` under ``options``:
    "triton", "compiled" or "torch" (the references), and on CPU numba's ``loops`` for
    ``task_merge`` without a keep rule and the task-arithmetic family's chunked passes (top-k,
    DARE's and DELLA's drops) and ``linear_sum`` where the inputs are bf16 — what the run report names."""
    options = options or DEFAULT
    if device.startswith("cuda"):
        return "triton" if options.triton and triton_available() and kernel not in options.disabled else "torch"
    if kernel == "linear_sum":  # never compiled: see ``compiled``
        return "loops for bf16 inputs, else torch" if use_loops(options) else "torch"
    large = torch.empty(compiled.MIN_ELEMENTS, device="meta")
    other = "compiled" if compiled.enabled(large, options, consensus) else "torch"
    if kernel.startswith("task_merge") and use_loops(options):  # and the family's chunked passes
        return f"loops for bf16 inputs, else {other}"
    return other


def _impl(tensor, options: KernelOptions | None, consensus: bool = False, kernel: str = ""):
    """The module whose function runs a step on ``tensor``: triton_kernels, compiled or reference
    (the reference on CUDA for a ``kernel`` the self-check disabled)."""
    options = options or DEFAULT
    if options.triton and kernel not in options.disabled and use_triton(tensor):
        from distmerge.kernels import triton_kernels  # imported on first use: it needs triton

        return triton_kernels
    return compiled if compiled.enabled(tensor, options, consensus) else reference


def linear_sum(
    tensors: list[torch.Tensor], weight: list[float], *, normalize: bool, options: KernelOptions | None = None
) -> torch.Tensor:
    """Σᵢ wᵢθᵢ, divided by Σᵢ wᵢ when ``normalize`` (model soups)."""
    return _impl(tensors[0], options, kernel="linear_sum").linear_sum(tensors, weight, normalize=normalize)


def linear_sum_into(
    tensors: list[torch.Tensor], weight: list[float], *, normalize: bool, out: torch.Tensor, options: KernelOptions | None = None
) -> bool:
    """``out`` = ``linear_sum(tensors, ...)`` rounded to ``out``'s dtype, in one loop where one
    can (bf16 tensors and ``out`` on CPU: numba's ``loops``). True when it did and every value
    is finite; False leaves ``out`` to the caller (``linear_sum``, then its own rounding)."""
    loops = use_loops(options) and loops_for(out, tensors)
    return bool(loops) and loops.linear_into(tensors, weight, normalize=normalize, out=out)


def task_combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weight: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    options: KernelOptions | None = None,
) -> torch.Tensor:
    """θ₀ + λ·(Σᵢ wᵢτᵢ, or the TIES disjoint sum)/D for given task vectors τᵢ."""
    impl = _impl(base, options, consensus, "task_combine")
    return impl.task_combine(base, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)


def task_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weight: list[float],
    keep: Keep | None = None,
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    options: KernelOptions | None = None,
) -> torch.Tensor:
    """θ₀ + λ·combine(τ̂ᵢ), τ̂ᵢ = θᵢ − θ₀ with only what ``keep`` keeps: the task-arithmetic family."""
    loops = keep is None and use_loops(options) and loops_for(base, tensors)
    if loops:  # bf16 as stored: one loop, no compiling
        merged = loops.task_merge(base, tensors, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)
        if merged is not None:  # else a NaN task vector: torch's NaN bits below
            return merged
    impl = _impl(base, options, consensus, kernel_name(keep))
    return impl.task_merge(base, tensors, weight, keep, consensus=consensus, normalize=normalize, lambda_=lambda_)


def task_merge_into(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weight: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    out: torch.Tensor,
    options: KernelOptions | None = None,
) -> bool:
    """``out`` = ``task_merge(base, tensors, ...)`` without a keep rule, rounded to ``out``'s
    dtype, in one loop where one can (bf16 on CPU: numba's ``loops``). True when it did and
    every value is finite; False leaves ``out`` to the caller."""
    loops = use_loops(options) and loops_for(base, [*tensors, out])
    return bool(loops) and loops.task_merge_into(base, tensors, weight, consensus=consensus, normalize=normalize, lambda_=lambda_, out=out)


def slerp_combine(c0, c1, a: torch.Tensor, b: torch.Tensor, *, options: KernelOptions | None = None) -> torch.Tensor:
    """c₀·a + c₁·b (float32 coefficients computed beforehand)."""
    return _impl(a, options, kernel="slerp_combine").slerp_combine(c0, c1, a, b)


def scale(x: torch.Tensor, s: float | None, *, options: KernelOptions | None = None) -> torch.Tensor:
    """s·x, or x when s is None."""
    return _impl(x, options, kernel="scale").scale(x, s)


def stock_interpolate(
    w0: torch.Tensor, models: list[torch.Tensor], t: torch.Tensor, *, options: KernelOptions | None = None, overwrite: bool = False
) -> torch.Tensor:
    """t·(Σᵢ θᵢ / N) + (1 − t)·θ₀, t one ratio or one per row; with ``overwrite``, the inputs
    may be overwritten (the torch reference then computes in place)."""
    impl = _impl(w0, options, kernel="stock_interpolate")
    if impl is reference:
        return reference.stock_interpolate(w0, models, t, overwrite=overwrite)
    return impl.stock_interpolate(w0, models, t)
