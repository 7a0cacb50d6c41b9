#!/usr/bin/env bash
# distmerge demo: from nothing to a merged model in a few minutes, on CPU.
#
#   bash launch/demo.sh
#
# 1. creates .venv-demo (python3 -m venv) unless it exists, installs torch and distmerge;
# 2. writes three tiny Llama checkpoints (a base and two fine-tunes) to demo-out/models;
# 3. writes a task-arithmetic recipe, shows the plan, runs the merge to demo-out/merged;
# 4. lists what was written.
#
# Environment: PYTHON (default python3), VENV (default .venv-demo),
# TORCH_SPEC (default torch==2.13.0), PIP_EXTRA (extra `pip install` arguments for torch,
# e.g. "--index-url https://download.pytorch.org/whl/cpu" for a CPU-only wheel).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv-demo}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
OUT="$ROOT/demo-out"
MODELS="$OUT/models"
RECIPE="$OUT/recipe.yaml"
MERGED="$OUT/merged"

step() { printf '\n==> %s\n' "$*"; }

step "Python environment: $VENV"
if [[ -x "$VENV/bin/python" ]]; then
    echo "using the existing $VENV"
else
    echo "creating $VENV with $PYTHON -m venv"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PY="$VENV/bin/python"

step "Installing $TORCH_SPEC"
# shellcheck disable=SC2086  # PIP_EXTRA is a list of words on purpose
"$PY" -m pip install --quiet "$TORCH_SPEC" ${PIP_EXTRA:-}

step "Installing distmerge from $ROOT"
"$PY" -m pip install --quiet -e "$ROOT"
DISTMERGE="$VENV/bin/distmerge"

step "Writing demo checkpoints to $MODELS (base, ft1, ft2)"
"$PY" -m distmerge.demo make "$MODELS"

step "Writing the recipe $RECIPE"
cat > "$RECIPE" <<EOF
# Task arithmetic: base + 0.5 * (ft1 - base) + 0.5 * (ft2 - base)
merge_method: task_arithmetic
base_model: $MODELS/base
models:
  - model: $MODELS/ft1
    parameters:
      weight: 0.5
  - model: $MODELS/ft2
    parameters:
      weight: 0.5
dtype: bfloat16
EOF
cat "$RECIPE"

step "distmerge plan $RECIPE"
"$DISTMERGE" plan "$RECIPE"

step "distmerge run $RECIPE $MERGED"
rm -rf "$MERGED"
"$DISTMERGE" run "$RECIPE" "$MERGED"

step "Done. The merged model is in $MERGED"
"$PY" - "$MERGED" <<'EOF'
import json, os, sys
from pathlib import Path

out = Path(sys.argv[1])
for f in sorted(out.rglob("*")):
    if f.is_file():
        print(f"  {f.stat().st_size:>12,d}  {f.relative_to(out)}")

index = out / "model.safetensors.index.json"
if index.exists():
    data = json.loads(index.read_text())
    n_files = len(set(data["weight_map"].values()))
    total = data["metadata"]["total_size"]
    print(f"\n{len(data['weight_map'])} tensors, {total:,d} bytes of weights in {n_files} file(s) "
          f"(from {index.name})")
else:  # a single model.safetensors without an index
    from safetensors import safe_open
    n, total = 0, 0
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            for k in g.keys():
                sl = g.get_slice(k)
                size = {"BF16": 2, "F16": 2, "F32": 4}.get(sl.get_dtype(), 0)
                for d in sl.get_shape():
                    size *= d
                n, total = n + 1, total + size
    print(f"\n{n} tensors, {total:,d} bytes of weights (from the safetensors headers)")
EOF
