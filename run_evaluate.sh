#!/usr/bin/env bash
# Judge generations in the sandbox and write pass@k: ./run_evaluate.sh [MODEL]
#   ./run_evaluate.sh Qwen/Qwen2.5-1.5B        -> results/<model>/<dataset>/{evaluations.jsonl,summary.json}
#   REFERENCE=1 ./run_evaluate.sh              -> self-check: every reference solution must pass
# MODEL: as given to run_inference.sh (default smollm2-135m). Knobs via env vars; unset ones keep
# `python -m btp.evaluate` defaults:
#   DATASETS="humaneval mbpp livecodebench"  WORKERS  TIMEOUT (CPU s per test)  LIMIT  RESULTS_DIR
#   ISOLATION (auto|rlimits-only)  CONFIG (JSON preset)  LCB_RELEASE  LCB_DATA_FILE  REFERENCE=1  FORCE=1  EXTRA_ARGS
# A dataset the model has no generations of is skipped with a note (btp.evaluate --skip-missing).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
MODEL=${1:-${MODEL:-smollm2-135m}}

flags=()
add() { if [ -n "${2:-}" ]; then flags+=("$1" "$2"); fi; }
add --config "${CONFIG:-}"
add --workers "${WORKERS:-}"
add --timeout "${TIMEOUT:-}"
add --limit "${LIMIT:-}"
add --results-dir "${RESULTS_DIR:-}"
add --isolation "${ISOLATION:-}"
add --release "${LCB_RELEASE:-}"
if [ -n "${REFERENCE:-}" ]; then
    flags+=(--reference)
    DATASETS=${DATASETS:-humaneval mbpp}   # LiveCodeBench has no reference solutions
else
    flags+=(--model "$MODEL" --skip-missing)
    DATASETS=${DATASETS:-humaneval mbpp livecodebench}
fi
if [ -n "${FRESH:-}" ]; then echo "run_evaluate.sh: error: FRESH=1 is now FORCE=1 — rerun with FORCE=1" >&2; exit 2; fi
if [ -n "${FORCE:-}" ]; then flags+=(--force); fi

status=0
for d in $DATASETS; do
    extra=()
    if [ "$d" = livecodebench ] && [ -n "${LCB_DATA_FILE:-}" ]; then extra=(--data-file "$LCB_DATA_FILE"); fi
    # shellcheck disable=SC2086
    "$PY" -m btp.evaluate --dataset "$d" "${flags[@]}" "${extra[@]}" ${EXTRA_ARGS:-} || status=$?
done
exit $status
