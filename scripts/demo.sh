#!/usr/bin/env bash
# The demo for a fresh machine: set up .venv (CPU torch; no-op when done), then train, save, reload and merge
# a LoRA adapter on a tiny random Llama. Extra arguments go to `fastadapters demo` (--out DIR, --fast, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m fastadapters.cli demo "$@"
