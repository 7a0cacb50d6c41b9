#!/usr/bin/env bash
# The GPU check of distmerge: run on a machine with a CUDA GPU, from anywhere; about 3-6 minutes, 9.5 at most (each step has a time limit).
#
#   benchmarks/gpu_check.sh [RESULTS_DIR]      # default: $OUT if set (the device tool's), else a new temp dir
#
# 1. the GPU (nvidia-smi) and the torch / triton versions;
# 2. the CUDA tests: the tests marked ``cuda`` (tests/test_cuda.py, ...), listed;
# 3. every Triton kernel against its torch reference at real sizes (8192x28672, a bf16 base and
#    three models), bitwise or the largest difference, and its GB/s against the GPU's peak
#    memory bandwidth (benchmarks/gpu_kernels.py);
# 4. end-to-end merges of small generated Llama models (distmerge.demo.make_family) on CUDA,
#    compared byte for byte with the same merges on CPU: linear (bf16, fp32), ties, dare_ties,
#    slerp; and which path each method took on CUDA (the run report's "kernels": "triton", or
#    "torch (self-check failed: ...)" when the start-up self-check switched a kernel off).
#
# Each step's output goes to the terminal and RESULTS_DIR/*.log (*.json); the last lines say which
# steps failed. Exit status: 0 all passed, 1 a step failed, 2 no GPU.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
RESULTS=${1:-${OUT:-$(mktemp -d /tmp/distmerge-gpu-check.XXXXXX)}}
WORK=$(mktemp -d /tmp/distmerge-gpu-work.XXXXXX)  # models and outputs (not kept)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device: run this on a GPU machine (torch.cuda.is_available() is False)" >&2
    exit 2
fi

failed=()
step() {  # step NAME TIMEOUT_S COMMAND...: run, tee to RESULTS/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name ($(date -u +%H:%M:%S))"
    timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { failed+=("$name (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))"); echo "--- $name FAILED (exit $rc)"; }
}

step gpu 30 bash -c '
    nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.memory,power.limit --format=csv
    nvidia-smi -L
    "$0" -c "import torch, triton; p = torch.cuda.get_device_properties(0); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"|\", p.name, f\"sm_{p.major}{p.minor}\", p.multi_processor_count, \"SMs\")"
' "$PY"

mapfile -t cuda_tests < <(grep -rlE --include='test_*.py' "pytest.mark.cuda\b" tests | sort)
echo
echo "CUDA tests (the tests marked cuda, in): ${cuda_tests[*]}"
step cuda-tests 150 "$PY" -m pytest -q -ra -p no:cacheprovider -m cuda "${cuda_tests[@]}"

step kernels 150 "$PY" benchmarks/gpu_kernels.py --json "$RESULTS/gpu_kernels.json"

step end-to-end 240 "$PY" - "$WORK" "$RESULTS" <<'EOF'
"""Small generated models merged on CUDA and on CPU by the distmerge CLI: the same bytes?"""
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from distmerge.demo import make_family

work, results = Path(sys.argv[1]), Path(sys.argv[2])
# hidden 512: the MLP matrices (786432 elements) take the chunked element-wise path, the rest whole
shape = dict(num_layers=2, hidden=512, intermediate=1536, heads=8, kv_heads=4, vocab=1024)
fams = {dt: make_family(work / f"models-{dt}", dtype=getattr(torch, dt), **shape) for dt in ("bfloat16", "float32")}


def recipe(method, dtype, models, **params):
    f = fams[dtype]
    entries = [{"model": str(f[m]), **({"parameters": p} if p else {})} for m, p in models]
    r = {"merge_method": method, "models": entries, "dtype": dtype}
    if method != "linear":
        r["base_model"] = str(f["base"])
    if params:
        r["parameters"] = params
    return r


ties_like = [("ft1", {"weight": 0.6, "density": 0.5}), ("ft2", {"weight": 0.4, "density": 0.3})]
CASES = [  # label, recipe, byte for byte (else: float32 within rtol = atol = 1e-6)
    ("linear-bf16", recipe("linear", "bfloat16", [("base", {"weight": 0.4}), ("ft1", {"weight": 0.3}), ("ft2", {"weight": 0.3})]), True),
    ("linear-f32", recipe("linear", "float32", [("ft1", {"weight": 0.7}), ("ft2", {"weight": -0.2})]), True),
    ("ties-f32", recipe("ties", "float32", ties_like), True),
    ("ties-bf16", recipe("ties", "bfloat16", ties_like), True),
    ("dare_ties-f32", recipe("dare_ties", "float32", ties_like, rescale=False), True),
    # dare_ties' default L1 rescale: its whole-tensor sums are reduced in another order on the GPU
    ("dare_ties-rescale-f32", recipe("dare_ties", "float32", ties_like), False),
    # slerp's coefficients come from whole-tensor norms and dot products, reduced by torch on the GPU
    ("slerp-f32", recipe("slerp", "float32", [("base", None), ("ft1", None)], t=0.3), False),
]


def run(name, r, device):
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(r))
    out, report = work / f"{name}-{device}", results / f"report-{name}-{device}.json"
    cmd = [sys.executable, "-m", "distmerge.cli", "run", str(path), str(out), "--device", device, "--quiet", "--report-json", str(report)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{name} on {device} failed (exit {p.returncode}): {p.stderr.strip()[-800:]}")
    warned = [line for line in p.stderr.splitlines() if "self-check" in line or "Triton kernel" in line]
    return out, json.loads(report.read_text()), warned


bad = 0
for name, r, exact in CASES:
    try:
        cpu, _, _ = run(name, r, "cpu")
        gpu, report, warned = run(name, r, "cuda")
    except RuntimeError as e:
        print(f"{name:<24} ERROR {e}")
        bad += 1
        continue
    shards = sorted(p.name for p in cpu.glob("*.safetensors"))
    same_files = shards == sorted(p.name for p in gpu.glob("*.safetensors")) and all(
        (cpu / s).read_bytes() == (gpu / s).read_bytes() for s in shards
    )
    differ, max_abs, close = 0, 0.0, True
    for s in shards:
        a, b = load_file(cpu / s), load_file(gpu / s)
        for key in a:
            x, y = a[key], b[key]
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
                differ += 1
                if x.is_floating_point() and x.shape == y.shape:
                    max_abs = max(max_abs, float((x.float() - y.float()).abs().max()))
                    close &= torch.allclose(y.float(), x.float(), rtol=1e-6, atol=1e-6)
    paths = report.get("kernels")
    if same_files:
        verdict = "byte-identical to CPU"
    else:
        verdict = f"{differ} tensors differ from CPU, max abs diff {max_abs:.3g}" + ("" if exact else f" ({'within' if close else 'NOT within'} 1e-6)")
    ok = same_files or (not exact and close)
    bad += not ok
    print(f"{name:<24} {verdict:<58} CUDA paths {paths}{'' if ok else '   <- FAIL'}")
    for line in warned:
        print("    " + line)
print(f"{len(CASES) - bad} of {len(CASES)} end-to-end merges as expected")
sys.exit(1 if bad else 0)
EOF

echo
echo "=== results in $RESULTS"
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: all steps passed"
    exit 0
fi
printf 'gpu_check: FAILED: %s\n' "${failed[@]}"
exit 1
