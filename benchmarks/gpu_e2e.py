"""Every merge method on CUDA against the same merge on the CPU, byte for byte, end to end.

    python benchmarks/gpu_e2e.py WORK_DIR RESULTS_DIR [--device cuda] [--jobs 8] [--only linear,ties]

Small generated Llama models (``distmerge.demo.make_family``: 4 layers, hidden 512, so the
MLP matrices take the chunked element-wise path and the rest merge whole), a bf16 and a
float32 family, each with a base and three fine-tunes. Each case is one recipe run by the
distmerge CLI twice, ``--device cpu`` and ``--device DEVICE``, in parallel subprocesses: the
float32 cases of tests/methods/test_methods_e2e.py (every mergekit method, with filters,
gradients, slices and 2-4 models), the randomized methods at density 0.5, and a few bf16 and
normalized-linear cases. Prints one line per case: byte-identical, or how many tensors
differ and by how much, and the path each method took on DEVICE (the run report's
``kernels``).

What must be byte-identical: the cases in ``EXACT`` (element-wise math: the Triton kernels
and the torch references compute the CPU's float32 operations). The others reduce whole
tensors (norms, dot products, L1 rescales, iterations), which a GPU orders differently: they
must agree within ``RTOL`` of each tensor's largest entry, or differ only where a selection
(arcee_fusion's top entries by KL divergence) flipped at a value its reduction moved, in at
most ``FLIPS`` of the entries (measured: 0.04%).

Called by benchmarks/gpu_check.sh; exits 1 when a case fails, 2 without the device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RTOL = 1e-4
"""Agreement of a reduced method: |cuda − cpu| ≤ RTOL · max |cpu| per tensor. Measured on an
H200 (2026-12-04): at most 2.9e-5 (multislerp, whose whole-tensor norms feed its angles),
3.7e-6 (slerp), 3e-6 (karcher), 2.6e-7 (della), 2e-7 (ties with a rescale)."""
FLIPS = 1e-3
"""Of a tensor's entries, at most this fraction beyond RTOL (a selection that flipped)."""

EXACT_METHODS = {"linear", "task_arithmetic", "passthrough", "nearswap", "ram"}
"""Element-wise methods: byte-identical in every case."""
EXACT = {
    "ties-2-defaults", "ties-slices-with-slice-parameters", "breadcrumbs-2-gamma", "breadcrumbs_ties-3",
    "ties-bf16", "ties-f32", "dare_ties-f32", "linear-bf16", "linear-f32", "linear-f32-normalize",
    "task_arithmetic-f32-normalize", "dare_ties-norescale-f32", "dare_linear-norescale-f32",
}  # fmt: skip
"""More cases without a whole-tensor reduction: top-k bands (found by exact integer counting on
either device) and Philox draws (the same bits on either device), no rescale."""


def cases(fams: dict) -> list[tuple[str, dict]]:
    """(label, recipe) for every case."""
    from tests.methods.test_methods_e2e import FLOAT32_CASES

    def models(f, *specs):
        return [{"model": str(f[m]), **({"parameters": p} if p else {})} for m, p in specs]

    def recipe(method, dtype, specs, base=True, **params):
        f = fams[dtype]
        r = {"merge_method": method, "models": models(f, *specs), "dtype": dtype}
        return r | ({"base_model": str(f["base"])} if base else {}) | ({"parameters": params} if params else {})

    two = [("ft1", {"weight": 0.6, "density": 0.5}), ("ft2", {"weight": 0.4, "density": 0.3})]
    out = [
        ("linear-bf16", recipe("linear", "bfloat16", [("base", {"weight": 0.4}), ("ft1", {"weight": 0.3}), ("ft2", {"weight": 0.3})], base=False)),
        ("linear-f32", recipe("linear", "float32", [("ft1", {"weight": 0.7}), ("ft2", {"weight": -0.2})], base=False)),
        # weights summing to 1.2: the division is not by a power of two (on CUDA, torch divides
        # by a number as a product with its reciprocal, an ulp off)
        ("linear-f32-normalize", recipe("linear", "float32", [("base", {"weight": 0.3}), ("ft1", {"weight": 0.7}), ("ft2", {"weight": 0.2})], base=False)),
        ("task_arithmetic-f32-normalize", recipe("task_arithmetic", "float32", [("ft1", {"weight": 0.7}), ("ft2", {"weight": 0.2})], normalize=True)),
        ("ties-f32", recipe("ties", "float32", two)),
        ("ties-bf16", recipe("ties", "bfloat16", two)),
        ("dare_ties-f32", recipe("dare_ties", "float32", two, rescale=False)),
        ("dare_ties-norescale-f32", recipe("dare_ties", "float32", two, rescale=False, normalize=False)),
        ("dare_linear-norescale-f32", recipe("dare_linear", "float32", two, rescale=False)),
        ("dare_ties-rescale-f32", recipe("dare_ties", "float32", two)),
        ("della-f32", recipe("della", "float32", [(m, p | {"epsilon": 0.1}) for m, p in two])),
        ("della_linear-f32", recipe("della_linear", "float32", [(m, p | {"epsilon": 0.1}) for m, p in two])),
        ("slerp-f32", recipe("slerp", "float32", [("base", None), ("ft1", None)], t=0.3)),
    ]
    for case in FLOAT32_CASES:
        out.append((case.id, case.build(fams["float32"]) | {"dtype": "float32"}))
    return out


def merge(label: str, recipe: dict, device: str, role: str, work: Path, results: Path) -> tuple[Path, dict, list[str], str | None]:
    """Run the CLI for ``role`` ("cpu" or "device"): (output dir, run report, self-check
    warnings, error or None)."""
    import yaml

    path = work / f"{label}-{role}.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out, report = work / f"{label}-{role}", results / f"report-{label}-{role}.json"
    cmd = [sys.executable, "-m", "distmerge.cli", "run", str(path), str(out), "--device", device, "--quiet", "--report-json", str(report)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    warned = [line for line in p.stderr.splitlines() if "self-check" in line or "Triton kernel" in line]
    if p.returncode:
        return out, {}, warned, f"exit {p.returncode}: " + " | ".join(p.stderr.strip().splitlines()[-3:])[-600:]
    return out, json.loads(report.read_text()), warned, None


def compare(cpu: Path, other: Path) -> tuple[bool, str, bool]:
    """(byte-identical, what differs, within RTOL or FLIPS)."""
    import torch
    from safetensors.torch import load_file

    shards = sorted(p.name for p in cpu.glob("*.safetensors"))
    if shards != sorted(p.name for p in other.glob("*.safetensors")):
        return False, "different output files", False
    if all((cpu / s).read_bytes() == (other / s).read_bytes() for s in shards):
        return True, "byte-identical to CPU", True
    differ, worst, flipped, close = 0, 0.0, 0.0, True
    for s in shards:
        a, b = load_file(cpu / s), load_file(other / s)
        if a.keys() != b.keys():
            return False, f"{s}: different tensors", False
        for key, x in a.items():
            y = b[key]
            if x.dtype != y.dtype or x.shape != y.shape:
                return False, f"{key}: {y.dtype} {tuple(y.shape)} on the device, {x.dtype} {tuple(x.shape)} on CPU", False
            if torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
                continue
            differ += 1
            if not x.is_floating_point():
                close = False
                continue
            x, y = x.double(), y.double()
            scale = float(x.abs().max()) or 1.0
            diff = (x - y).abs() / scale
            worst = max(worst, float(diff.max()))
            beyond = float((diff > RTOL).double().mean())
            flipped = max(flipped, beyond)
            close &= beyond <= FLIPS
    what = f"{differ} tensors differ, max |diff| {worst:.2g} of the tensor's largest entry"
    if flipped:
        what += f", {flipped:.2%} of a tensor's entries beyond {RTOL:g}"
    return False, what, close


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="models and outputs go here")
    ap.add_argument("results", type=Path, help="run reports (JSON) go here")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--jobs", type=int, default=8, help="merges at a time (default 8)")
    ap.add_argument("--only", default="", help="comma-separated methods (default: every case)")
    args = ap.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_e2e: no CUDA device: run this on a GPU machine", file=sys.stderr)
        return 2
    from distmerge.demo import make_family

    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    shape = dict(num_layers=4, hidden=512, intermediate=1536, heads=8, kv_heads=4, vocab=1024, n_finetunes=3)
    fams = {dt: make_family(args.work / f"models-{dt}", dtype=getattr(torch, dt), **shape) for dt in ("bfloat16", "float32")}
    todo = cases(fams)
    if args.only:
        wanted = set(args.only.split(","))
        todo = [(label, r) for label, r in todo if r["merge_method"] in wanted]

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = {(label, role): pool.submit(merge, label, r, dev, role, args.work, args.results)
                for label, r in todo for dev, role in (("cpu", "cpu"), (args.device, "device"))}  # fmt: skip
        bad = 0
        for label, r in todo:
            (cpu, _, _, cpu_error), (dev, report, warned, error) = runs[label, "cpu"].result(), runs[label, "device"].result()
            exact = label in EXACT or r["merge_method"] in EXACT_METHODS
            if cpu_error or error:
                ok, verdict = False, f"ERROR on {'cpu' if cpu_error else args.device}: {cpu_error or error}"
            else:
                same, verdict, close = compare(cpu, dev)
                ok = same or (close and not exact)
                if not ok and exact:
                    verdict += " (byte-identical expected)"
            bad += not ok
            paths = "; ".join(f"{k}: {v}" for k, v in report.get("kernels", {}).items())
            print(f"{label:<46} {'ok  ' if ok else 'FAIL'} {verdict}   [{paths}]", flush=True)
            for line in warned:
                print("    " + line[-300:])
    print(f"{len(todo) - bad} of {len(todo)} end-to-end merges on {args.device} as expected")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
