#!/usr/bin/env bash
# Generate completions for the benchmarks: ./run_inference.sh [MODEL]  (one engine load for all datasets)
# MODEL: HF id, local folder, or smollm2-135m (default). Knobs via env vars; unset ones keep
# `python -m btp.generate` defaults:
#   DATASETS="humaneval mbpp livecodebench"  N  TEMPERATURE  TOP_P  MAX_TOKENS  SEED  LIMIT
#   BACKEND (vllm|hf|server)  BASE_URL (server)  RESULTS_DIR  PROMPT_STYLE (auto|chat|completion)
#   CONFIG (JSON preset)  TP / PP (tensor / pipeline parallel size)  MAX_MODEL_LEN  GPU_MEM_UTIL  DTYPE
#   LCB_RELEASE (v6)  LCB_DATA_FILE (local LCB JSONL)  EXTRA_ARGS
#
# The service (vLLM's OpenAI-compatible server; generate through it with BACKEND=server BASE_URL=...):
#   ./run_inference.sh serve [MODEL] [--port N] [--host H] [--log FILE] [--wait S] [vLLM serve flags...]
#   ./run_inference.sh stop [--port N]
# serve resolves MODEL as btp does, serves it under btp's model id, waits for /health (--wait seconds, default
# 900), prints the URL and returns; the log and pid file are $SERVICE_DIR/serve-<port>.{log,pid} (default
# $BTP_CACHE/service). Env knobs TP PP DP MAX_MODEL_LEN DTYPE; any other flag goes to vLLM as it is, e.g.
# --tensor-parallel-size 4 --data-parallel-size 2 --distributed-executor-backend ray --enforce-eager.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SERVICE_DIR=${SERVICE_DIR:-${BTP_CACHE:-$HOME/.cache/btp}/service}

die() { echo "run_inference.sh: error: $*" >&2; exit 2; }

# parse the service's own flags into PORT HOST LOG WAIT PIDFILE; the rest is left in VLLM_ARGS
service_flags() {
  PORT=${PORT:-8000}; HOST=${HOST:-127.0.0.1}; LOG=""; WAIT=${WAIT:-900}; VLLM_ARGS=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) PORT=${2:?--port needs a number}; shift 2 ;;
      --host) HOST=${2:?--host needs an address}; shift 2 ;;
      --log) LOG=${2:?--log needs a file}; shift 2 ;;
      --wait) WAIT=${2:?--wait needs seconds}; shift 2 ;;
      *) VLLM_ARGS+=("$1"); shift ;;
    esac
  done
  [[ "$PORT" =~ ^[0-9]+$ ]] || die "--port $PORT is no number — give e.g. --port 8000"
  PIDFILE="$SERVICE_DIR/serve-$PORT.pid"
  LOG=${LOG:-$SERVICE_DIR/serve-$PORT.log}
  local h=$HOST; [ "$h" = 0.0.0.0 ] && h=127.0.0.1
  URL="http://$h:$PORT"
}

healthy() { "$PY" -c 'import sys, urllib.request as u; u.urlopen(sys.argv[1] + "/health", timeout=5)' "$URL" 2>/dev/null; }
alive() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

stop_server() {  # SIGTERM to the server's process group (API server and engine workers), SIGKILL after 60 s
  if ! alive; then rm -f "$PIDFILE"; echo "run_inference.sh: no server of ours on port $PORT" >&2; return 0; fi
  local pid; pid=$(cat "$PIDFILE")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for _ in $(seq 60); do kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null || true  # what is left of the group after a minute
  rm -f "$PIDFILE"
  echo "run_inference.sh: stopped the server on port $PORT (pid $pid)" >&2
}

serve() {
  local model=smollm2-135m
  if [ $# -gt 0 ] && [[ "$1" != --* ]]; then model=$1; shift; fi
  service_flags "$@"
  alive && die "a server already runs on port $PORT (pid $(cat "$PIDFILE")) — stop it: ./run_inference.sh stop --port $PORT"
  healthy && die "$URL already answers — pick another --port"
  local ref; mapfile -t ref < <("$PY" -m btp.models --model "$model" --print path,model_id)
  [ "${#ref[@]}" -ge 2 ] || exit 2  # btp.models said why on stderr
  ref=("${ref[@]: -2}")  # the last two lines: a first use of the embedded model reports its conversion before
  local extra=()
  [ -n "${TP:-}" ] && extra+=(--tensor-parallel-size "$TP")
  [ -n "${PP:-}" ] && extra+=(--pipeline-parallel-size "$PP")
  [ -n "${DP:-}" ] && extra+=(--data-parallel-size "$DP")
  [ -n "${MAX_MODEL_LEN:-}" ] && extra+=(--max-model-len "$MAX_MODEL_LEN")
  [ -n "${DTYPE:-}" ] && extra+=(--dtype "$DTYPE")
  # no GPU: vLLM's CPU KV cache would take far more than btp's runs need (as the offline engine in btp.generate)
  command -v nvidia-smi >/dev/null || export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
  # vLLM's API takes 4 stop strings by default; btp's benchmarks have more (HumanEval 7)
  export VLLM_MAX_STOP_STRINGS=${VLLM_MAX_STOP_STRINGS:-32}
  mkdir -p "$SERVICE_DIR" "$(dirname "$LOG")"
  # `--generation-config vllm`: unset sampling values default as in the offline engine, not from the model's
  # generation_config (btp sends every value anyway); own session, so that stop reaches the engine workers
  setsid "$PY" -m vllm.entrypoints.openai.api_server --model "${ref[0]}" --served-model-name "${ref[1]}" \
    --host "$HOST" --port "$PORT" --generation-config vllm "${extra[@]}" "${VLLM_ARGS[@]}" >>"$LOG" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$PIDFILE"
  local t0=$SECONDS
  until healthy; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"; tail -n 20 "$LOG" >&2
      die "the server exited while starting (log above, all of it in $LOG) — fix its flags or the model"
    fi
    if [ $((SECONDS - t0)) -ge "$WAIT" ]; then
      stop_server; tail -n 20 "$LOG" >&2
      die "the server did not answer $URL/health within $WAIT s (stopped; log in $LOG) — raise --wait"
    fi
    sleep 2
  done
  echo "run_inference.sh: serving ${ref[1]} at $URL (pid $pid, $((SECONDS - t0)) s to start, log $LOG);" \
    "stop: ./run_inference.sh stop --port $PORT" >&2
  echo "$URL"
}

case "${1:-}" in
  serve) shift; serve "$@"; exit 0 ;;
  stop) shift; service_flags "$@"; stop_server; exit 0 ;;
esac

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
add --pipeline-parallel-size "${PP:-}"
add --base-url "${BASE_URL:-}"
add --max-model-len "${MAX_MODEL_LEN:-}"
add --gpu-memory-utilization "${GPU_MEM_UTIL:-}"
add --dtype "${DTYPE:-}"

add --release "${LCB_RELEASE:-}"
add --data-file "${LCB_DATA_FILE:-}"   # applies to livecodebench only when several datasets run

# One process for all datasets: the engine loads once.
# shellcheck disable=SC2086
exec "$PY" -m btp.generate "${flags[@]}" --dataset "$(echo $DATASETS | tr ' ' ',')" ${EXTRA_ARGS:-}
