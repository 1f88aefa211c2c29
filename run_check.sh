#!/usr/bin/env bash
# Progress of every model x dataset under a results tree: python -m btp.check, with the repo's .venv if present.
#   ./run_check.sh                        table of results/
#   ./run_check.sh --results-dir DIR --model M --dataset D --json --deep
#   ./run_check.sh --sweep configs/sweep_demo.yaml   a sweep's jobs: done / running / failed / blocked / pending
# Exit status 1 when a file is broken (its name and line are printed), 2 when the results dir is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
PY=python3
[ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m btp.check "$@"
