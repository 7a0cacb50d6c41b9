"""Peak RSS per rank as the model gets deeper: bench.py's JSON from runs at several sizes.

bench.py sets a checkpoint's size by its layer count (hidden 2048 from about 1 GB up), so runs at
``--size-gb 1.25, 2.5, 5`` merge the same tensors, 11, 25 and 54 layers of them. A merge
streams tensor by tensor, so its peak RSS per rank should be set by the largest tensor
(embed_tokens, lm_head) and not by the depth. This prints one row per method and runner
with the peak at each depth, the deepest over the shallowest, and the verdict against
``FLAT`` (printed as PASS or MISS, like bench.py's targets):

    python benchmarks/bench.py --skip-mergekit --size-gb 1.25 --json > d1.json   # and 2.5, 5
    python benchmarks/depth.py d1.json d2.json d5.json
"""

from __future__ import annotations

import argparse
import json
import sys

FLAT = 1.10
"""Largest accepted ratio of the deepest model's peak RSS per rank to the shallowest's."""


def peaks(dumps: list[dict]) -> tuple[list[int], dict[tuple[str, str], dict[int, int]]]:
    """The layer counts, shallowest first, and each (method, runner)'s largest peak RSS per
    rank, in bytes, at each layer count (the highest of its rounds and ranks). The dumps
    must differ only in depth: the same hidden size, deltas and device."""
    same = {(d["shape"]["hidden"], d["deltas"], d["device"]) for d in dumps}
    if len(same) != 1:
        raise ValueError(f"the runs differ in more than depth (hidden, deltas, device): {sorted(same)}")
    layers = sorted({d["shape"]["num_layers"] for d in dumps})
    if len(layers) != len(dumps):
        raise ValueError(f"two runs have the same depth ({[d['shape']['num_layers'] for d in dumps]} layers)")
    table: dict[tuple[str, str], dict[int, int]] = {}
    for d in dumps:
        depth = d["shape"]["num_layers"]
        for r in d.get("rounds") or d["runs"]:
            if r["ok"] and r["peak_rss"]:
                cell = table.setdefault((r["method"], r["runner"]), {})
                cell[depth] = max(cell.get(depth, 0), r["peak_rss"])
    return layers, table


def verdicts(layers: list[int], table: dict[tuple[str, str], dict[int, int]]) -> list[tuple[str, str, float | None, bool]]:
    """(method, runner, deepest / shallowest peak, flat) per row; a row measured at fewer
    than the shallowest and the deepest depth has no ratio and is not flat."""
    out = []
    for (method, runner), by_depth in table.items():
        ratio = by_depth[layers[-1]] / by_depth[layers[0]] if layers[0] in by_depth and layers[-1] in by_depth else None
        out.append((method, runner, ratio, ratio is not None and ratio <= FLAT))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="peak RSS per rank against depth, from bench.py --json dumps")
    ap.add_argument("dumps", nargs="+", help="bench.py --json outputs of runs at two or more sizes")
    args = ap.parse_args(argv)
    if len(args.dumps) < 2:
        ap.error("give the dumps of at least two sizes")
    try:
        layers, table = peaks([json.loads(open(p).read()) for p in args.dumps])
    except ValueError as e:
        ap.error(str(e))
    print(f"{'method':16s}{'runner':13s}" + "".join(f"{f'{n} layers':>11s}" for n in layers) + "   deepest/shallowest")
    rows = verdicts(layers, table)
    for (method, runner, ratio, flat), by_depth in zip(rows, table.values()):
        cells = "".join(f"{by_depth[n] / 1e9:8.2f} GB" if n in by_depth else f"{'-':>11s}" for n in layers)
        verdict = "no ratio" if ratio is None else f"{ratio:.2f}x {'PASS' if flat else 'MISS'}"
        print(f"{method:16s}{runner:13s}{cells}   {verdict}")
    misses = sum(not flat for *_, flat in rows)
    print(f"\npeak RSS per rank flat with depth (deepest ≤ {FLAT:.2f}× the shallowest): {len(rows) - misses} PASS, {misses} MISS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
