#!/usr/bin/env python
"""Many outputs from one read: a recipe's ``sweep:`` of N variants against one variant alone.

    python benchmarks/variants.py [--size-gb 0.5] [--variants 4] [--methods linear,ties] [--workdir DIR]

For each method it runs, on the checkpoints of ``bench.py`` (base + 2 fine-tunes, bf16, in the
page cache), ``distmerge run`` of the recipe with one set of parameters, and of the same recipe
with a ``sweep:`` of N parameter sets (N outputs, each byte-identical to its own run alone), one
after the other, twice in alternating order; it prints the wall time of each, the ratio of the
sweep's to the single run's (the faster of the two runs of each), and the peak RSS of each.

It also runs the I/O floor of each (``bench.py _floor``: a Python process that reads the input
bytes once and writes, fsynced, the output bytes: one output's, or N outputs'): writing N
outputs is N times the bytes, so the sweep's ratio is read against the floor's.

Targets (issue 16): 4 linear variants in at most 2x the wall time of one; 4 TIES variants (two
densities x two weights) in at most 2.5x.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the checkpoints, recipes and measurement of the main benchmark)

TARGETS = {"linear": 2.0, "ties": 2.5}
SWEEPS = {
    "linear": "sweep:\n  weight: [0.1, 0.2, 0.3, 0.4]\n",
    "ties": "sweep:\n  density: [0.3, 0.5]\n  weight: [0.5, 0.7]\n",
    "task_arithmetic": "sweep:\n  weight: [0.3, 0.5, 0.7, 0.9]\n",
    "dare_ties": "sweep:\n  density: [0.3, 0.5]\n  weight: [0.5, 0.7]\n",
}


def sweep_recipe(method: str, models: dict[str, Path], variants: int) -> str:
    """The main benchmark's recipe with the swept parameter moved from the models to a sweep."""
    b, f1, f2 = (str(models[m]) for m in bench.MODELS)
    values = [round(0.2 + 0.6 * k / max(1, variants - 1), 3) for k in range(variants)]
    if method == "linear":
        return (
            f"merge_method: linear\nmodels:\n  - model: {b}\n  - model: {f1}\n  - model: {f2}\n"
            f"dtype: bfloat16\nsweep:\n  weight: {values}\n"
        )
    half = max(1, variants // 2)
    densities = [round(0.3 + 0.4 * k / max(1, half - 1), 3) for k in range(half)]
    weights = [round(0.5 + 0.4 * k / max(1, variants // half - 1), 3) for k in range(variants // half)]
    return (
        f"merge_method: {method}\nbase_model: {b}\nmodels:\n  - model: {f1}\n  - model: {f2}\n"
        f"dtype: bfloat16\nsweep:\n  density: {densities}\n  weight: {weights}\n"
    )


def single_recipe(method: str, models: dict[str, Path]) -> str:
    return sweep_recipe(method, models, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=0.5, help="size of each of the 3 checkpoints, GB (default 0.5)")
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument("--methods", default="linear,ties")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "distmerge-bench"))
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)

    work = Path(args.workdir).resolve()
    root = work / f"models-{bench.size_key(args.size_gb)}"
    shape = bench.choose_shape(args.size_gb * 1e9)
    models = {m: root / m for m in bench.MODELS}
    if not all(p.is_dir() for p in models.values()):
        subprocess.run([sys.executable, str(bench.HERE), "_make", str(root), str(args.size_gb * 1e9)], check=True)
    inputs = sorted(p for m in models.values() for p in m.glob("*.safetensors"))
    print(f"checkpoints: 3 x {shape['bytes'] / 1e9:.3f} GB bf16 ({shape['num_layers']} layers, hidden {shape['hidden']}) in {root}")
    print(f"machine load average {bench.loadavg()}; {args.variants} variants per sweep")
    recipes, logs, outs = work / "variants-recipes", work / "variants-logs", work / "variants-out"
    for d in (recipes, logs, outs):
        d.mkdir(parents=True, exist_ok=True)
    cmd = bench.tool("distmerge", "distmerge.cli")
    shard = math.ceil(shape["bytes"] / 3)
    rows = []
    for method in args.methods.split(","):
        texts = {"one": single_recipe(method, models), "sweep": sweep_recipe(method, models, args.variants)}
        for kind, text in texts.items():
            (recipes / f"{method}-{kind}.yml").write_text(text)
        plan = bench.load_plan(cmd, recipes / f"{method}-one.yml", shard)
        spec = bench.floor_spec(plan)
        floors = {"floor-one": spec, "floor-sweep": {**spec, "files": [[f"v{k}-{n}", b] for k in range(args.variants) for n, b in spec["files"]]}}
        for kind, f in floors.items():
            (recipes / f"{method}-{kind}.json").write_text(json.dumps(f))
        best: dict[str, bench.Run] = {}
        for order in (("one", "sweep", "floor-one", "floor-sweep"), ("floor-sweep", "floor-one", "sweep", "one")):
            for kind in order:
                bench.warm(inputs)
                out = outs / f"{method}-{kind}"
                shutil.rmtree(out, ignore_errors=True)
                if kind.startswith("floor"):
                    command = [sys.executable, str(bench.HERE), "_floor", str(recipes / f"{method}-{kind}.json"), str(out)]
                else:
                    command = [*cmd, "run", str(recipes / f"{method}-{kind}.yml"), str(out), "--quiet", "--out-shard-size", str(shard)]
                run = bench.Run(method, kind, command)
                bench.measure(run, logs / f"{method}-{kind}.log", args.timeout, env=bench.RUN_ENV)
                if not run.ok:
                    print(f"{method} {kind}: FAILED {run.error}")
                    return 1
                if kind not in best or run.wall < best[kind].wall:
                    best[kind] = run
                print(f"  {method:16s} {kind:11s} {run.wall:6.1f} s  peak RSS {run.peak / 1e9:.2f} GB", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        one, many = best["one"].wall, best["sweep"].wall
        floor_one, floor_many = best["floor-one"].wall, best["floor-sweep"].wall
        rows.append((method, one, many, floor_one, floor_many, best["one"].peak, best["sweep"].peak))
    n = args.variants
    print(f"\n| method | 1 output (s) | {n} outputs, one read (s) | ratio | target | I/O floor 1 / {n} outputs (s) | floor ratio | peak RSS 1 / {n} (GB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, a, b, fa, fb, pa, pb in rows:
        target = TARGETS.get(method)
        verdict = "" if target is None else (f"<= {target}x " + ("PASS" if b / a <= target else "MISS"))
        print(f"| {method} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {verdict} | {fa:.1f} / {fb:.1f} | {fb / fa:.2f}x | {pa / 1e9:.2f} / {pb / 1e9:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
