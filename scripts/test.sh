#!/usr/bin/env bash
# The test command for a fresh machine (and CI, via .ci/run). Two runs, each in its own venv set up by
# scripts/setup_env.sh (a no-op when nothing changed), both from the repository root:
#   pinned  the whole suite on the pinned versions (requirements/test.txt: the GPU image's, where they install)
#   latest  the compatibility subset (COMPAT below: PEFT parity, prefix, prompt, train, Trainer/TRL, kernels in the
#           interpreter) on the latest releases pip resolves today (requirements/latest.txt)
# Extra arguments go to pytest and then only the pinned run happens (FASTADAPTERS_TEST_SETS overrides):
#   bash scripts/test.sh tests/test_ops_lora.py -k odd
#   FASTADAPTERS_TEST_SETS=latest bash scripts/test.sh
set -uo pipefail
cd "$(dirname "$0")/.."
# One intra-op thread: the tests use tiny tensors, and on a 2-core machine shared with other processes
# torch's spinning thread pool made small ops 10-50x slower. Set OMP_NUM_THREADS yourself to override.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ $# -gt 0 ]; then SETS=${FASTADAPTERS_TEST_SETS:-pinned}; else SETS=${FASTADAPTERS_TEST_SETS:-pinned latest}; fi
COMPAT="tests/test_layout.py tests/test_lora_peft.py tests/test_dora_peft.py tests/test_prefix.py tests/test_prompt.py
  tests/test_model.py tests/test_train.py tests/test_trainer.py tests/test_trl.py tests/test_kernels_lora.py
  tests/test_model_kernels.py tests/test_backend.py"
# Test files run in parallel over the cores (pytest-xdist; one file stays on one worker, so module fixtures run
# once), at most 4 workers: FASTADAPTERS_TEST_WORKERS=0 runs them in this process.
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 2)  # nproc obeys OMP_NUM_THREADS
WORKERS=${FASTADAPTERS_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
PYTEST=(-m pytest -q -p no:cacheprovider --timeout=900 --durations=5)
[ "$WORKERS" -gt 0 ] && PYTEST+=(-n "$WORKERS" --dist loadfile)
status=0
summary=()
for set in $SETS; do
  start=$(date +%s); log=$(mktemp)
  if ! bash scripts/setup_env.sh "$set"; then
    summary+=("$set: set-up failed"); status=1; continue
  fi
  venv=.venv; [ "$set" = latest ] && venv=.venv-latest
  versions=$("$venv/bin/python" -c "import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'peft', 'triton', 'accelerate', 'numpy')))")
  echo "== $set: $versions; pytest workers: $WORKERS"
  if [ "$set" = latest ] && [ $# -eq 0 ]; then
    files=(); for f in $COMPAT; do [ -e "$f" ] && files+=("$f"); done
    "$venv/bin/python" "${PYTEST[@]}" "${files[@]}" | tee "$log"; rc=${PIPESTATUS[0]}
  else
    "$venv/bin/python" "${PYTEST[@]}" "$@" | tee "$log"; rc=${PIPESTATUS[0]}
  fi
  line=$(grep -E "^(=+ )?[0-9]+ (passed|failed)" "$log" | tail -1)
  summary+=("$set ($versions): ${line:-exit $rc} [$(( $(date +%s) - start )) s with set-up]")
  [ "$rc" -eq 0 ] || status=1
done
echo; printf '%s\n' "${summary[@]}"
exit $status
