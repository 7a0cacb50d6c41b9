#!/usr/bin/env bash
# CI: distmerge installed the way the README says (`pip install torch`, then `pip install .`,
# no test extra) in a venv of its own, then what a user runs first:
#   1. every module imports (the optional ones say what to install, or are never imported);
#   2. a 2-rank merge through torchrun on tiny demo checkpoints, checked with `verify --full`;
#   3. the README's demo, launch/demo.sh, in the same venv.
# It fails when any of them fails, or when torch warns "Failed to initialize NumPy" (issue 14:
# numpy was not declared; the test extra brought it in, so the suite never noticed that every
# rank of a multi-rank run died in all_gather_object).
#
# Environment: PYTHON (default python3); CLEAN_VENV: where to make the venv and keep it
# afterwards (default: a temporary directory, removed at the end). It is made afresh each
# time, so that nothing left from an earlier install hides a missing dependency.
#
# It works on a copy of the checkout (the files git tracks or would track), so that it can run
# beside .ci/run's own install: pip builds in the source tree (egg-info, build/), and the demo
# writes demo-out/ there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$WORK/src" -xf -
cd "$WORK/src"
VENV=${CLEAN_VENV:-$WORK/venv}
LOG=$WORK/log  # everything the commands print, searched for the NumPy warning at the end
start=$SECONDS

step() { printf '\n==> clean install, at %d s: %s\n' $((SECONDS - start)) "$*"; }
# --no-compile: byte-compiling all of torch at install took 50 of torch's 65 s here; Python
# compiles the few modules a run imports on first use instead. pip's quiet mode still warns
# about each missing directory of a local index; keep the rest.
pip_install() { "$VENV/bin/python" -m pip install -q --no-compile "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

step "a fresh $VENV with torch==2.13.0, then distmerge without extras"
"$PYTHON" -m venv --clear "$VENV"
VENV=$(cd "$VENV" && pwd)
pip_install torch==2.13.0
pip_install .
PY=$VENV/bin/python
installed=$SECONDS
ROOT=$(pwd)
cd "$WORK"  # not the checkout: `python -m distmerge...` must find the installed package

step "every module imports"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, pkgutil, distmerge

# Imported only when `import triton` works (distmerge.kernels.triton_available); CUDA builds
# of torch bring triton, the CPU build does not.
NEEDS_TRITON = {"distmerge.kernels.triton_kernels"}
failed = []
for m in pkgutil.walk_packages(distmerge.__path__, "distmerge."):
    if m.name in NEEDS_TRITON:
        continue
    try:
        importlib.import_module(m.name)
    except Exception as e:
        failed.append(f"{m.name}: {type(e).__name__}: {e}")
if failed:
    raise SystemExit("modules that do not import in a plain install:\n  " + "\n  ".join(failed))
print("all distmerge modules import")
EOF

step "a 2-rank merge with torchrun"
"$PY" -m distmerge.demo make "$WORK/models" --finetunes 2 --layers 2 --shards 2 2>&1 | tee -a "$LOG"
cat > "$WORK/recipe.yml" <<EOF
merge_method: ties
base_model: $WORK/models/base
models:
  - model: $WORK/models/ft1
    parameters: {weight: 0.6, density: 0.5}
  - model: $WORK/models/ft2
    parameters: {weight: 0.4, density: 0.5}
EOF
"$VENV/bin/torchrun" --standalone --nproc-per-node 2 -m distmerge.cli run "$WORK/recipe.yml" "$WORK/merged" \
    --out-shard-size 100KB 2>&1 | tee -a "$LOG"
"$VENV/bin/distmerge" verify "$WORK/merged" --full 2>&1 | tee -a "$LOG"

step "the README's demo: launch/demo.sh"
# Its plan lists every tensor: the log shows the end, or all of it when the demo fails.
VENV=$VENV PYTHON=$PYTHON bash "$ROOT/launch/demo.sh" > "$WORK/demo.log" 2>&1 || { cat "$WORK/demo.log"; exit 1; }
tail -n 16 "$WORK/demo.log"

if grep -n "Failed to initialize NumPy\|Numpy is not available" "$LOG" "$WORK/demo.log"; then
    echo "clean install: torch cannot use numpy in a plain install of distmerge (see above)" >&2
    exit 1
fi
echo "clean install: OK (install $((installed - start)) s, checks $((SECONDS - installed)) s)"
