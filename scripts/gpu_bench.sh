#!/usr/bin/env bash
# One short GPU check (no internet needed): agreement with CPU references, then btp vs straightforward timings.
#   scripts/gpu_bench.sh [--cpu-smoke] [--models qwen3-4b,llama-3.2-3b] [--dtypes bf16,fp32] ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
exec "$PY" scripts/gpu_bench.py "$@"
