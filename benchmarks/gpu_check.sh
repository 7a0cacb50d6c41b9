#!/usr/bin/env bash
# The GPU check of distmerge: run on a machine with a CUDA GPU, from anywhere; about 4 minutes (an H200,
# 16 cores: 4 min 10 s), 9 at most (each step has a time limit).
#
#   benchmarks/gpu_check.sh [RESULTS_DIR]      # default: $OUT if set (the device tool's), else a new temp dir
#
# 1. the GPU (nvidia-smi) and the torch / triton versions;
# 2. the CUDA tests: the tests marked ``cuda`` (tests/test_cuda.py, ...), listed;
# 3. every Triton kernel against its torch reference at real sizes (8192x28672, a bf16 base and
#    three models), bitwise or the largest difference, and its GB/s against the GPU's peak
#    memory bandwidth (benchmarks/gpu_kernels.py);
# 4. every merge method end to end on CUDA against the same merge on CPU (benchmarks/gpu_e2e.py:
#    small generated Llama models; the float32 cases of tests/methods/test_methods_e2e.py, the
#    randomized methods, bf16 and normalized-linear cases), byte for byte where the math is
#    element-wise, else within 1e-5; and which path each method took on CUDA (the run report's
#    "kernels": "triton", or "torch (self-check failed: ...)" when the start-up self-check
#    switched a kernel off).
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
step cuda-tests 90 "$PY" -m pytest -q -ra -p no:cacheprovider -m cuda "${cuda_tests[@]}"

step kernels 120 "$PY" benchmarks/gpu_kernels.py --json "$RESULTS/gpu_kernels.json"

step end-to-end 300 "$PY" benchmarks/gpu_e2e.py "$WORK" "$RESULTS"

echo
echo "=== results in $RESULTS"
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: all steps passed"
    exit 0
fi
printf 'gpu_check: FAILED: %s\n' "${failed[@]}"
exit 1
