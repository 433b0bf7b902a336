#!/usr/bin/env bash
# One command for a GPU machine: GPU tests + the `quick` preset of every benchmark (kernel level, model level,
# decode), results in OUTDIR (summary.md with the tables, results.csv, plots/*.png, junit.xml, env.txt, pytest.log,
# bench.log, setup.log). Meant to finish in under 6 minutes on one H200.
#   bash scripts/gpu_check.sh OUTDIR            (on the device machine: bash scripts/gpu_check.sh "$OUT")
#   bash scripts/gpu_check.sh OUTDIR --skip-tests --ops lora,model     (options of benchmarks/gpu_check.py)
# Uses $PYTHON, else python3 (which holds torch on the GPU machine). Nothing is installed: fastadapters runs from
# the repository root and maps the top-level kernels/ folder to fastadapters.kernels itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:?usage: bash scripts/gpu_check.sh OUTDIR [--smoke] [other benchmarks/gpu_check.py options]}
shift
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PY" -c 'import sys; print("python:", sys.version)' >"$OUTDIR/setup.log" 2>&1
cat "$OUTDIR/setup.log"
exec "$PY" -m benchmarks.gpu_check "$OUTDIR" "$@"
