#!/usr/bin/env bash
# Run a distmerge merge as NPROC ranks on this machine (one per GPU, or CPU processes):
#
#     launch/torchrun.sh NPROC RECIPE OUT [distmerge run options...]
#     launch/torchrun.sh 8 configs/ties-70b-3way.yml ./merged --out-shard-size 5GB
#
# A thin wrapper around `torchrun --standalone --nproc-per-node NPROC -m distmerge.cli run`.
# The python that runs it is $PYTHON (default: python from PATH, e.g. an activated venv).
# A failed or killed run is resumed by running the same command again.
set -euo pipefail

if [ "$#" -lt 3 ]; then
    echo "usage: $0 NPROC RECIPE OUT [distmerge run options...]" >&2
    exit 2
fi
NPROC=$1
RECIPE=$2
OUT=$3
shift 3
case "$NPROC" in
    '' | *[!0-9]* | 0) echo "$0: NPROC must be a positive integer, not '$NPROC'" >&2; exit 2 ;;
esac

# torchrun sets OMP_NUM_THREADS=1 per worker when unset (and says so); say it ourselves.
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    cores=$(nproc 2>/dev/null || echo 1)
    OMP_NUM_THREADS=$(( cores / NPROC > 0 ? cores / NPROC : 1 ))
    export OMP_NUM_THREADS
fi

exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" \
    -m distmerge.cli run "$RECIPE" "$OUT" "$@"
