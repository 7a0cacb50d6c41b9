"""Every Triton kernel against its torch reference on a GPU, at real sizes, and its memory bandwidth.

    python benchmarks/gpu_kernels.py                       # 8192x28672, 3 models, every kernel
    python benchmarks/gpu_kernels.py --shape 4096x14336 --kernels scale,task_merge/band --json out.json

First the run's start-up self-check of every kernel (``selfcheck.check``: a 17x241 tensor, the
kernel on the GPU against its reference on the CPU, the truth every test holds distmerge to).
Then for each case of each kernel (``distmerge.kernels.selfcheck.cases``: the same calls the
self-check makes, here on tensors of ``--shape``; a bf16 base and bf16, fp16 and fp32
models), prints whether the kernel's result equals the reference's computed on the same GPU
(bitwise, or the largest difference; rescaled cases are compared within rtol = atol = 1e-6),
the kernel's median time over ``--repeat`` timed calls after ``--warmup`` (CUDA events), its
bandwidth (bytes read and written / time: inputs once per pass, the float32 output once) and
that as a fraction of the GPU's peak memory bandwidth, and the torch reference's time.

Exits 2 at once without a CUDA device, 1 when a kernel differs from its reference.
Called by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

NO_GPU = "no CUDA device: run this on a GPU machine"

PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 SXM": 3.35e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100-SXM4-40GB": 1.555e12,
    "A100-PCIE-40GB": 1.555e12,
}
"""Peak memory bandwidth in bytes/s from the vendors' data sheets, by a part of the device
name, for when torch does not report the memory clock and bus width. Longest match wins."""


def parse_shape(text: str) -> tuple[int, ...]:
    """"8192x28672" -> (8192, 28672)."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is sizes joined by x (8192x28672), got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape's sizes are positive, got {text!r}")
    return shape


def moved_bytes(reads: list, written, passes: int = 1) -> int:
    """Bytes a kernel moves at least: every input read once per pass, the output written once."""
    return passes * sum(x.numel() * x.element_size() for x in reads) + written.numel() * written.element_size()


def gb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def peak_bandwidth(name: str, memory_clock_khz: int | None, bus_width_bits: int | None) -> tuple[float | None, str]:
    """(bytes/s, where the figure comes from): double data rate x clock x bus width when torch
    reports them, else ``PEAK_BANDWIDTH`` by name, else (None, "unknown")."""
    if memory_clock_khz and bus_width_bits:
        return 2 * memory_clock_khz * 1e3 * bus_width_bits / 8, "memory clock x bus width"
    matches = [key for key in PEAK_BANDWIDTH if key.lower() in name.lower()]
    if matches:
        key = max(matches, key=len)
        return PEAK_BANDWIDTH[key], f"data sheet ({key})"
    return None, "unknown"


def median_ms(fn, warmup: int, repeat: int) -> float:
    """Median over ``repeat`` calls of ``fn`` after ``warmup`` calls, in ms, by CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=parse_shape, default=(8192, 28672), help="tensor shape, e.g. 8192x28672 (default)")
    ap.add_argument("--kernels", default="", help="comma-separated kernel names (default: all)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    # The self-check's time from cold (a run's first start-up on a machine): compiled kernels
    # go to a cache of this process's own, read by Triton when it compiles.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="distmerge-triton-cache-")
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_kernels: {NO_GPU} (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    try:
        from distmerge.kernels import triton_kernels
    except Exception as e:
        print(f"gpu_kernels: the Triton kernels do not import ({type(e).__name__}: {e}); pip install triton", file=sys.stderr)
        return 2
    from distmerge.kernels import selfcheck

    names = [k for k in args.kernels.split(",") if k] or list(selfcheck.KERNELS)
    unknown = set(names) - set(selfcheck.KERNELS)
    if unknown:
        print(f"gpu_kernels: unknown kernels {sorted(unknown)}; known: {', '.join(selfcheck.KERNELS)}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    props = torch.cuda.get_device_properties(device)
    peak, source = peak_bandwidth(props.name, getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None))
    peak_text = f"{peak / 1e9:.0f} GB/s ({source})" if peak else "unknown (name not in PEAK_BANDWIDTH)"
    print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB; peak memory bandwidth {peak_text}")
    print(f"shape {'x'.join(map(str, args.shape))}, base bf16, models fp16/fp32/bf16, median of {args.repeat} after {args.warmup} warm-up calls")
    from distmerge.kernels import KernelOptions

    shape_text = "x".join(map(str, selfcheck.SHAPE))
    print(f"the run's start-up self-check ({shape_text}: each kernel on the GPU against its torch reference on the CPU):")
    start = time.perf_counter()
    _, findings = selfcheck.check(names, device, KernelOptions())
    torch.cuda.synchronize(device)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    selfcheck.check(names, device, KernelOptions())
    torch.cuda.synchronize(device)
    warm = time.perf_counter() - start
    print(f"  ({cold:.2f} s with an empty Triton cache: compiling every kernel for these inputs; {warm:.2f} s again)")
    failed = sum(not f.ok for f in findings)
    for f in findings:
        print(f"  {f.kernel:<20} {'matches' if f.ok else 'DIFFERS'}: {f.detail}", flush=True)
    checks = [dict(kernel=f.kernel, ok=f.ok, result=f.detail) for f in findings]
    print(f"\n{'x'.join(map(str, args.shape))}: each kernel against its torch reference on the GPU (what a kernel switched off runs)")
    data = selfcheck.inputs(args.shape, device)
    rows = []
    header = f"{'case':<44} {'vs torch on the GPU':<34} {'triton ms':>9} {'GB/s':>7} {'of peak':>7} {'torch ms':>9}"
    print(header)
    for kernel in names:
        try:
            for case in selfcheck.cases(kernel, triton_kernels, data):
                got, want = case.run(), case.reference()
                problem = selfcheck.compare(got, want, case.exact)
                if problem:
                    failed += 1
                    verdict = "DIFFERS: " + problem
                elif case.exact:
                    verdict = "bitwise equal"
                else:
                    verdict = f"within 1e-6, max abs diff {float((got - want).abs().max()):.2g}"
                nbytes = moved_bytes(case.reads, got, case.passes)
                del got, want
                ms = median_ms(case.run, args.warmup, args.repeat)
                torch_ms = median_ms(case.reference, 1, max(1, args.repeat // 3))
                rate = gb_per_s(nbytes, ms / 1e3)
                fraction = rate * 1e9 / peak if peak else None
                rows.append(dict(case=case.label, kernel=kernel, ok=not problem, result=verdict, bytes=nbytes, triton_ms=ms,
                                 gb_per_s=rate, fraction_of_peak=fraction, torch_ms=torch_ms))  # fmt: skip
                frac = f"{fraction:.0%}" if fraction is not None else "?"
                print(f"{case.label:<44} {verdict[:34]:<34} {ms:>9.3f} {rate:>7.0f} {frac:>7} {torch_ms:>9.3f}", flush=True)
                if problem and len(verdict) > 34:
                    print(f"    {verdict}")
        except Exception as e:
            failed += 1
            line = f"{type(e).__name__}: {e}".splitlines()[0]
            rows.append(dict(case=kernel, kernel=kernel, ok=False, result="ERROR: " + line))
            print(f"{kernel:<44} ERROR: {line}", flush=True)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=props.name, peak_bandwidth=peak, peak_source=source, shape=args.shape, self_check=checks,
                           self_check_seconds=dict(empty_cache=cold, again=warm),
                           cases=rows), f, indent=1)  # fmt: skip
    n = len(rows) + len(checks)
    print(f"{n - failed} of {n} self-checks and cases match their reference" + (f"; {failed} DIFFER or fail" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
