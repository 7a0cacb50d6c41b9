"""A run's start-up check of the Triton kernels on its own device, against the torch references.

The kernels are tested under the Triton interpreter on CPU (tests/kernels/test_kernels.py),
which is not the GPU a run gets: its compiler, its rounding, its driver. So before a run
merges on CUDA, each kernel it will use is run once on a small tensor on that device (an odd
number of elements, so the last block is partial) and compared with its reference there,
as exactly as the tests compare them: bitwise, or within ``TOL`` where a rescale's L1 sums
are reduced in another order (``triton_kernels``). A kernel that differs or raises is
switched to its torch reference for the run (``KernelOptions.disabled``), with one warning
naming it and what differed; the findings go into the run report.

Under TRITON_INTERPRET=1 the same function checks the interpreted kernels on CPU tensors
(tests/kernels/test_selfcheck.py).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Iterable

import torch

from distmerge.kernels import KernelOptions, reference
from distmerge.kernels.keep import Band, Draw, Keep, Top

KERNELS = (
    "linear_sum",
    "task_combine",
    "task_merge",
    "task_merge/band",
    "task_merge/draw",
    "task_merge/mask",
    "slerp_combine",
    "scale",
    "stock_interpolate",
)
"""What can be checked: each public launcher of ``triton_kernels``, ``task_merge`` once per
kind of keep rule (``kernels.kernel_name``)."""

SHAPE = (17, 241)
"""4097 elements: four full blocks of 1024 and a partial one."""
TOL = dict(rtol=1e-6, atol=1e-6)
"""Where a rescale's L1 norms set a scale factor (as tests/kernels/test_kernels.py)."""
WEIGHTS = [0.7, -0.3, 1.2]
SEEDS = [12345, 0x9E3779B97F4A7C15]  # one Philox key ≥ 2**63


@dataclasses.dataclass(frozen=True, slots=True)
class Finding:
    """The check of one kernel."""

    kernel: str
    ok: bool
    detail: str
    """"bitwise equal", "within rtol/atol 1e-6 (max abs diff …)", or what differed or was raised."""


def check(
    kernels: Iterable[str], device: str | torch.device, options: KernelOptions, *, shape: tuple[int, ...] = SHAPE
) -> tuple[KernelOptions, list[Finding]]:
    """Check each of ``kernels`` (``KERNELS`` names) on ``device`` against its reference.

    Returns ``options`` with the kernels that failed added to ``disabled``, and one
    ``Finding`` per kernel, in order. Each failure is also one warning naming the kernel.
    """
    names = list(dict.fromkeys(kernels))
    unknown = [k for k in names if k not in KERNELS]
    if unknown:
        raise ValueError(f"no self-check for kernels {unknown}; known: {', '.join(KERNELS)}")
    device = torch.device(device)
    findings = []
    try:
        from distmerge.kernels import triton_kernels
    except Exception as e:  # triton broken at import: every kernel fails alike
        findings = [Finding(k, False, _first_line(e)) for k in names]
    else:
        inputs = _inputs(shape, device)
        findings = [_check_one(k, triton_kernels, inputs) for k in names]
    for f in findings:
        if not f.ok:
            warnings.warn(
                f"distmerge: the {f.kernel} Triton kernel does not match its torch reference on {device} ({f.detail}); "
                "this run uses the torch reference for it",
                stacklevel=2,
            )
    failed = frozenset(f.kernel for f in findings if not f.ok)
    return dataclasses.replace(options, disabled=options.disabled | failed), findings


def _first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text.strip().splitlines()[0][:300]


def _inputs(shape, device) -> dict:
    """A base and three models in the three storage dtypes (bf16, fp32, fp16), some task-vector
    entries tied in magnitude (the top-k tie rule), made on CPU and moved to ``device``."""
    g = torch.Generator().manual_seed(20)
    base = torch.randn(shape, generator=g)
    x1 = base + 0.1 * torch.randn(shape, generator=g)
    x2 = base + 0.1 * torch.randn(shape, generator=g)
    x3 = base + 0.1 * torch.randn(shape, generator=g)
    base = base.to(torch.bfloat16)
    x2.view(-1)[::7] = base.float().view(-1)[::7] + 0.25  # |τ| = 0.25 exactly, many times
    models = [x1.to(torch.float16), x2, x3.to(torch.bfloat16)]
    masks = [torch.rand(shape, generator=g) < p for p in (0.5, 0.3)]
    t_rows = torch.rand(shape[:-1] + (1,), generator=g)
    move = lambda x: x.to(device)  # noqa: E731
    return dict(base=move(base), models=[move(x) for x in models], masks=[move(m) for m in masks], t_rows=move(t_rows))


def _band(delta: torch.Tensor, k: int, skip: int) -> Band:
    """The band of magnitude ranks skip .. k − 1 with the reference's tie rule at both cuts:
    the threshold is the k-th largest |δ| and the cut the flat index of the last tie kept."""

    def top(count: int) -> Top:
        flat = delta.abs().reshape(-1).float().cpu()
        order = torch.sort(flat, descending=True, stable=True).indices
        threshold = flat[order[count - 1]]
        return Top(float(threshold), int(order[count - 1]))

    return Band(top(k), top(skip))


def _keep(kind: str, base, models, masks, rescale: bool) -> Keep:
    """A keep decision of ``kind`` for the three models, the last kept whole (None)."""
    n = base.numel()
    if kind == "band":
        rules = tuple(_band(x.float() - base.float(), k, s) for x, k, s in zip(models[:2], (n // 2, n // 3), (3, n // 10)))
    elif kind == "draw":
        rules = (Draw(SEEDS[0], 0.5), Draw(SEEDS[1], 0.3))
    else:
        rules = tuple(masks)
    return Keep((*rules, None), rescale)


def _check_one(kernel: str, tk, inputs: dict) -> Finding:
    """Run ``kernel``'s cases; the first that differs or raises is the finding."""
    try:
        for got, want, exact in _cases(kernel, tk, inputs):
            problem = _compare(got(), want(), exact)
            if problem:
                return Finding(kernel, False, problem)
    except Exception as e:
        return Finding(kernel, False, _first_line(e))
    return Finding(kernel, True, "bitwise equal" if kernel in _EXACT else f"within rtol/atol {TOL['rtol']}")


_EXACT = set(KERNELS) - {"task_merge/band", "task_merge/draw", "task_merge/mask"}
"""Kernels every case of which is bitwise (the keep kinds have a rescaled case)."""


def _cases(kernel: str, tk, inputs: dict) -> Iterable[tuple[Callable, Callable, bool]]:
    """(kernel call, reference call, bitwise?) for each case of ``kernel``: the TIES consensus
    path and the linear one where the kernel has both."""
    base, models, masks = inputs["base"], inputs["models"], inputs["masks"]
    pair = lambda fn, *a, **k: (lambda: getattr(tk, fn)(*a, **k), lambda: getattr(reference, fn)(*a, **k))  # noqa: E731
    if kernel == "linear_sum":
        yield *pair("linear_sum", models, WEIGHTS, normalize=True), True
    elif kernel == "task_combine":
        deltas = [x.float() - base.float() for x in models]
        yield *pair("task_combine", base, deltas, WEIGHTS, consensus=True, normalize=True, lambda_=1.0), True
        yield *pair("task_combine", base, deltas, WEIGHTS, consensus=False, normalize=True, lambda_=0.7), True
    elif kernel.startswith("task_merge"):
        kind = kernel.partition("/")[2]
        for consensus, rescale in [(True, False), (False, True)]:
            keep = _keep(kind, base, models, masks, rescale) if kind else None
            options = dict(consensus=consensus, normalize=consensus, lambda_=1.0 if consensus else 0.7)
            yield *pair("task_merge", base, models, WEIGHTS, keep, **options), not (kind and rescale)
    elif kernel == "slerp_combine":
        yield *pair("slerp_combine", torch.tensor(0.8253), torch.tensor(0.2131), base, models[0]), True
    elif kernel == "scale":
        yield *pair("scale", models[2], 0.37), True
    elif kernel == "stock_interpolate":
        for t in (torch.tensor([0.37], device=base.device), inputs["t_rows"]):
            yield *pair("stock_interpolate", base, models, t), True


def _compare(got: torch.Tensor, want: torch.Tensor, exact: bool) -> str | None:
    """None when ``got`` matches ``want`` (bitwise, or within TOL with the same entries zero);
    else what differed, in a few words."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"got {got.dtype} {tuple(got.shape)}, the reference {want.dtype} {tuple(want.shape)}"
    if exact and torch.equal(got.view(torch.int32), want.view(torch.int32)):
        return None
    if not exact and torch.equal(got != 0, want != 0) and torch.allclose(got, want, **TOL):
        return None
    diff = (got - want).abs()
    count = int((got.view(torch.int32) != want.view(torch.int32)).sum())
    how = "bitwise" if exact else f"rtol/atol {TOL['rtol']}"
    return f"{count} of {got.numel()} entries differ ({how}), max abs diff {float(diff.nan_to_num(float('inf')).max()):.3g}"
