#!/usr/bin/env bash
# One command for a GPU machine: GPU tests + the `quick` preset of every benchmark (kernel level, model level,
# decode), results in OUTDIR (summary.md with the tables, results.csv, plots/*.png, junit.xml, env.txt, pytest.log,
# bench.log, setup.log). Meant to finish in under 6 minutes on one H200.
#   bash scripts/gpu_check.sh OUTDIR            (on the device machine: bash scripts/gpu_check.sh "$OUT")
#   bash scripts/gpu_check.sh OUTDIR --skip-tests --ops lora,model     (options of benchmarks/gpu_check.py)
# Uses $PYTHON, else python3 (which holds torch on the GPU machine). It tries an editable install so that the
# top-level kernels/ folder imports as fastadapters.kernels; when that cannot be done, benchmarks/gpu_check.py
# falls back to PYTHONPATH plus a small sitecustomize shim. Set FASTADAPTERS_NO_INSTALL=1 to skip the install.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:?usage: bash scripts/gpu_check.sh OUTDIR [--smoke] [other benchmarks/gpu_check.py options]}
shift
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
  echo "python: $("$PY" -c 'import sys; print(sys.version)' 2>&1)"
  if "$PY" -c "import fastadapters.kernels" >/dev/null 2>&1; then
    echo "fastadapters.kernels already importable"
  elif [ -n "${FASTADAPTERS_NO_INSTALL:-}" ]; then
    echo "FASTADAPTERS_NO_INSTALL set: not installing"
  elif timeout 45 "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1; then
    echo "installed with pip install --no-deps --no-build-isolation -e ."
  else
    echo "pip install -e . failed: benchmarks/gpu_check.py will use the PYTHONPATH shim"
  fi
} >"$OUTDIR/setup.log" 2>&1
cat "$OUTDIR/setup.log"
exec "$PY" -m benchmarks.gpu_check "$OUTDIR" "$@"
