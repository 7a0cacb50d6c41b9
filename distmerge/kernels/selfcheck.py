"""A run's start-up check of the Triton kernels on its own device, against the torch references.

The kernels are tested under the Triton interpreter on CPU (tests/kernels/test_kernels.py),
which is not the GPU a run gets: its compiler, its rounding, its driver. So before a run
merges on CUDA, each kernel it will use is run once on a small tensor on that device (an odd
number of elements, so the last block is partial) and compared with its reference computed
on the CPU, the path every other test compares with mergekit: bitwise, or within ``TOL``
where a rescale's L1 sums are reduced in another order (``triton_kernels``). A kernel that
differs or raises is switched to its torch reference for the run (``KernelOptions.disabled``),
with one warning naming it and what differed; the findings go into the run report.

Not the reference on the GPU: torch's CUDA ops are not the CPU's bit for bit (a division by
a number is a multiplication by its reciprocal there; a sum of the weights is added in
another order). On the first GPU this project was lent (an H200, 2026-12-04), a check against
the references on the GPU switched off linear_sum and stock_interpolate, whose Triton
kernels gave the CPU's bits, for a torch path that did not.

Under TRITON_INTERPRET=1 the same function checks the interpreted kernels on CPU tensors
(tests/kernels/test_selfcheck.py).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Iterable, Iterator

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
        on_cpu = inputs(shape, "cpu")
        data = moved(on_cpu, device)
        findings = [_check_one(k, triton_kernels, data, on_cpu) for k in names]
    for f in findings:
        if not f.ok:
            warnings.warn(
                f"distmerge: the {f.kernel} Triton kernel on {device} does not match its torch reference on the CPU ({f.detail}); "
                "this run uses the torch reference for it",
                stacklevel=2,
            )
    failed = frozenset(f.kernel for f in findings if not f.ok)
    return dataclasses.replace(options, disabled=options.disabled | failed), findings


def _first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text.strip().splitlines()[0][:300]


def moved(data: dict, device: str | torch.device) -> dict:
    """``inputs``' tensors, copied to ``device`` (the same values)."""
    return {key: [x.to(device) for x in v] if isinstance(v, list) else v.to(device) for key, v in data.items()}


def inputs(shape: tuple[int, ...], device: str | torch.device, seed: int = 20) -> dict:
    """A base and three models in the three storage dtypes (bf16, fp16, fp32), some task-vector
    entries tied in magnitude (the top-k tie rule), two keep masks and per-row ratios, drawn on
    ``device`` (the same values on every CPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    randn = lambda: torch.randn(shape, generator=g, device=device)  # noqa: E731
    base = randn()
    x1, x2, x3 = (base + 0.1 * randn() for _ in range(3))
    base = base.to(torch.bfloat16)
    x2.view(-1)[::7] = base.float().view(-1)[::7] + 0.25  # |τ| = 0.25 exactly, many times
    masks = [torch.rand(shape, generator=g, device=device) < p for p in (0.5, 0.3)]
    t_rows = torch.rand(shape[:-1] + (1,), generator=g, device=device)
    return dict(base=base, models=[x1.to(torch.float16), x2, x3.to(torch.bfloat16)], masks=masks, t_rows=t_rows)


def _band(delta: torch.Tensor, k: int, skip: int) -> Band:
    """The band of magnitude ranks skip .. k − 1 with the reference's tie rule at both cuts:
    the threshold is the k-th largest |δ| and the cut the flat index of the last tie kept."""
    flat = delta.abs().reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices

    def top(count: int) -> Top:
        j = order[count - 1]
        return Top(float(flat[j]), int(j))

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


def _check_one(kernel: str, tk, inputs: dict, on_cpu: dict) -> Finding:
    """Run ``kernel``'s cases on ``inputs`` and their references on the same values on the
    CPU (``on_cpu``); the first case that differs or raises is the finding. Where the
    reference itself raises, the kernel stays on (the reference path would fail the run)
    and the finding says it was not checked."""
    try:
        for case, truth in zip(cases(kernel, tk, inputs), cases(kernel, tk, on_cpu)):
            try:
                want = truth.reference()
            except Exception as e:
                warnings.warn(f"distmerge: the {kernel} Triton kernel was not checked: its torch reference raised {_first_line(e)}")
                return Finding(kernel, True, "not checked: the torch reference raised " + _first_line(e))
            problem = compare(case.run().cpu(), want, case.exact)
            if problem:
                return Finding(kernel, False, problem)
    except Exception as e:
        return Finding(kernel, False, _first_line(e))
    return Finding(kernel, True, "bitwise equal" if kernel in _EXACT else f"within rtol/atol {TOL['rtol']}")


_EXACT = set(KERNELS) - {"task_merge/band", "task_merge/draw", "task_merge/mask"}
"""Kernels every case of which is bitwise (the keep kinds have a rescaled case)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Case:
    """One call of a kernel and of its reference on the same inputs (also timed by
    benchmarks/gpu_kernels.py)."""

    label: str
    run: Callable[[], torch.Tensor]
    """The Triton launcher's call."""
    reference: Callable[[], torch.Tensor]
    exact: bool
    """Bitwise; else within TOL (a rescale's L1 sums)."""
    reads: list[torch.Tensor]
    """What the kernel reads per pass (for bytes moved)."""
    passes: int = 1
    """Passes over ``reads``: 2 with a rescale (its norms first)."""


def cases(kernel: str, tk, inputs: dict) -> Iterator[Case]:
    """The cases of ``kernel`` (``KERNELS``) on ``inputs`` (``inputs``), ``tk`` the module of
    Triton launchers: the TIES consensus path and the linear one where the kernel has both."""
    base, models, masks = inputs["base"], inputs["models"], inputs["masks"]

    def case(label, fn, *args, exact=True, reads=(), passes=1, **kwargs):
        run = lambda: getattr(tk, fn)(*args, **kwargs)  # noqa: E731
        ref = lambda: getattr(reference, fn)(*args, **kwargs)  # noqa: E731
        return Case(label, run, ref, exact, list(reads), passes)

    if kernel == "linear_sum":
        yield case("linear_sum normalize", "linear_sum", models, WEIGHTS, normalize=True, reads=models)
    elif kernel == "task_combine":
        deltas = [x.float() - base.float() for x in models]
        for consensus in (True, False):
            label = f"task_combine {'consensus' if consensus else 'linear'}"
            yield case(label, "task_combine", base, deltas, WEIGHTS, consensus=consensus, normalize=True,
                       lambda_=1.0 if consensus else 0.7, reads=[base, *deltas])  # fmt: skip
    elif kernel.startswith("task_merge"):
        kind = kernel.partition("/")[2]
        for consensus, rescale in [(True, False), (False, True)]:
            keep = _keep(kind, base, models, masks, rescale) if kind else None
            rescaled = bool(kind and rescale)
            label = f"{kernel} {'consensus' if consensus else 'linear'}{' rescale' if rescaled else ''}"
            reads = [base, *models, *(masks if kind == "mask" else ())]
            yield case(label, "task_merge", base, models, WEIGHTS, keep, consensus=consensus, normalize=consensus,
                       lambda_=1.0 if consensus else 0.7, exact=not rescaled, reads=reads, passes=2 if rescaled else 1)  # fmt: skip
    elif kernel == "slerp_combine":
        yield case("slerp_combine", "slerp_combine", torch.tensor(0.8253), torch.tensor(0.2131), base, models[0], reads=[base, models[0]])
    elif kernel == "scale":
        yield case("scale", "scale", models[2], 0.37, reads=[models[2]])
    elif kernel == "stock_interpolate":
        for t, label in ((torch.tensor([0.37], device=base.device), "one t"), (inputs["t_rows"], "t per row")):
            yield case(f"stock_interpolate {label}", "stock_interpolate", base, models, t, reads=[base, *models])
    else:
        raise ValueError(f"no cases for kernel {kernel!r}")


def compare(got: torch.Tensor, want: torch.Tensor, exact: bool) -> str | None:
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
