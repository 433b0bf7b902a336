#!/usr/bin/env bash
# The test command for a fresh machine (and CI, via .ci/run): set up .venv with the CPU build of torch
# (scripts/setup_env.sh, a no-op when nothing changed), then run the whole suite. Extra arguments go to pytest:
#   bash scripts/test.sh tests/test_ops_lora.py -k odd
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# One intra-op thread: the tests use tiny tensors, and on a 2-core machine shared with other processes
# torch's spinning thread pool made small ops 10-50x slower. Set OMP_NUM_THREADS yourself to override.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=600 --durations=10 "$@"
