#!/usr/bin/env bash
# Creates (or reuses) .venv with a CPU build of torch and everything the tests and the demo need.
# torch is pinned first so that no other package can pull a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.fastadapters-setup
want="$(cat requirements/*.txt setup.py pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip || echo "setup_env: could not upgrade pip; going on with $(python -m pip --version)"
  python -m pip install -q torch==2.13.0
  python -m pip install -q -c requirements/constraints.txt -r requirements/test.txt
  python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
