#!/usr/bin/env bash
# distmerge demo: tiny models with real skills, merged, in a few minutes on CPU.
#
#   bash launch/demo.sh
#
# 1. creates .venv-demo (python3 -m venv) unless it exists, installs torch and distmerge;
# 2. trains a tiny Llama base that knows three skills a little (reverse a word, look letters
#    up in a table, sort letters) and one fine-tune per skill (about a minute, one core),
#    and prints their skills table: exact match on held-out words, in percent;
# 3. merges the "reverse" and "lookup" fine-tunes three ways (task arithmetic, TIES, and
#    negating lookup's task vector), showing the plan of the first;
# 4. prints the skills table after the merges, and where the merged models and the plot
#    (demo-out/skills.png) are.
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

step "Installing distmerge from $ROOT (with matplotlib, for the plot)"
"$PY" -m pip install --quiet -e "$ROOT[plot]"
DISTMERGE="$VENV/bin/distmerge"

step "Training the skill models in $MODELS (base, reverse, lookup, sort)"
"$PY" -m distmerge.skills make "$MODELS"

step "Skills before merging (exact match on 256 held-out words per skill, %)"
"$PY" -m distmerge.skills score "$MODELS"/{base,reverse,lookup,sort}

# recipe NAME METHOD "MODEL:WEIGHT ..." [EXTRA YAML LINES]: $OUT/NAME.yaml over $MODELS
recipe() {
    local name=$1 method=$2 models=$3 extra=${4:-}
    {
        echo "merge_method: $method"
        echo "base_model: $MODELS/base"
        echo "models:"
        for m in $models; do
            echo "  - model: $MODELS/${m%%:*}"
            echo "    parameters: {weight: ${m##*:}$extra}"
        done
        echo "dtype: float32"
    } > "$OUT/$name.yaml"
}
# base + (reverse - base) + (lookup - base): both skills in one model
recipe task_arithmetic task_arithmetic "reverse:1.0 lookup:1.0"
# TIES: keep the largest 70% of each task vector, elect a sign per weight, sum what agrees
recipe ties ties "reverse:1.0 lookup:1.0" ", density: 0.7"
echo "parameters: {normalize: false}" >> "$OUT/ties.yaml"
# base - (lookup - base): forget lookup, keep the rest
recipe negate_lookup task_arithmetic "lookup:-1.0"

step "The recipe $OUT/task_arithmetic.yaml"
cat "$OUT/task_arithmetic.yaml"

step "distmerge plan $OUT/task_arithmetic.yaml"
"$DISTMERGE" plan "$OUT/task_arithmetic.yaml"

for name in task_arithmetic ties negate_lookup; do
    step "distmerge run $OUT/$name.yaml $MERGED/$name"
    rm -rf "${MERGED:?}/$name"
    "$DISTMERGE" run "$OUT/$name.yaml" "$MERGED/$name"
done

step "Skills after merging (%)"
"$PY" -m distmerge.skills score "$MODELS"/{base,reverse,lookup} "$MERGED"/{task_arithmetic,ties,negate_lookup} \
    --plot "$OUT/skills.png"

step "Done"
echo "merged models:  $MERGED/{task_arithmetic,ties,negate_lookup} (Hugging Face Llama checkpoints)"
echo "recipes:        $OUT/*.yaml"
if [[ -f "$OUT/skills.png" ]]; then echo "plot:           $OUT/skills.png (the table above as bars)"; fi
echo "task arithmetic should score well above the base on both reverse and lookup;"
echo "negate_lookup should have lost lookup and kept reverse and sort."
