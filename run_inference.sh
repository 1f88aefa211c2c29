#!/usr/bin/env bash
# Generate completions for the benchmarks: ./run_inference.sh [MODEL]  (one engine load for all datasets)
# MODEL: HF id, local folder, or smollm2-135m (default). Knobs via env vars; unset ones keep
# `python -m btp.generate` defaults:
#   DATASETS="humaneval mbpp livecodebench"  N  TEMPERATURE  TOP_P  MAX_TOKENS  SEED  LIMIT  BACKEND (vllm|hf)
#   RESULTS_DIR  PROMPT_STYLE (auto|chat|completion)  CONFIG (JSON preset)  TP (tensor parallel size)
#   MAX_MODEL_LEN  GPU_MEM_UTIL  DTYPE  LCB_RELEASE (v6)  LCB_DATA_FILE (local LCB JSONL)  EXTRA_ARGS
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
MODEL=${1:-${MODEL:-smollm2-135m}}
DATASETS=${DATASETS:-humaneval mbpp livecodebench}

flags=(--model "$MODEL")
add() { if [ -n "${2:-}" ]; then flags+=("$1" "$2"); fi; }
add --config "${CONFIG:-}"
add --n "${N:-}"
add --temperature "${TEMPERATURE:-}"
add --top-p "${TOP_P:-}"
add --max-tokens "${MAX_TOKENS:-}"
add --seed "${SEED:-}"
add --limit "${LIMIT:-}"
add --backend "${BACKEND:-}"
add --results-dir "${RESULTS_DIR:-}"
add --prompt-style "${PROMPT_STYLE:-}"
add --tensor-parallel-size "${TP:-}"
add --max-model-len "${MAX_MODEL_LEN:-}"
add --gpu-memory-utilization "${GPU_MEM_UTIL:-}"
add --dtype "${DTYPE:-}"

add --release "${LCB_RELEASE:-}"
add --data-file "${LCB_DATA_FILE:-}"   # applies to livecodebench only when several datasets run

# One process for all datasets: the engine loads once.
# shellcheck disable=SC2086
exec "$PY" -m btp.generate "${flags[@]}" --dataset "$(echo $DATASETS | tr ' ' ',')" ${EXTRA_ARGS:-}
