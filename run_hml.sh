#!/usr/bin/env bash
# Main job: generation + evaluation (when missing), then the analysis stages (entropy lens, head ablation,
# Taylor pruning, then the CMA-ES head search on Taylor's samples and split) for MODEL over the datasets and both
# modes. Every stage skips what is already done.
#
#   ./run_hml.sh                 embedded default (SmolLM2-135M) on a small subset; finishes on a laptop CPU
#   ./run_hml.sh MODEL           a HF id or folder: full datasets, analyses on its correct generations
#
# Knobs (environment): DATASETS, LIMIT (problems per dataset), N (samples per problem), MAX_TOKENS,
# BACKEND (vllm|hf), SOURCE (generations|reference), SELECT (correct|incorrect|all), NUM_SAMPLES, MODES,
# STAGES (default "entropy_lens ablation taylor cmaes_search"), RESULTS_DIR, LCB_DATA_FILE (LiveCodeBench JSONL; the
# hub is used otherwise), EXTRA_GEN_FLAGS, EXTRA_ANALYSIS_FLAGS, CMAES_FLAGS (btp.cmaes_search only).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
PY=.venv/bin/python

if [ $# -eq 0 ]; then
  # The embedded model passes ~5% of HumanEval, so its correct generations are too few to analyse: the demo
  # analyses the benchmarks' reference solutions, teacher-forced in the model's own chat prompt.
  MODEL=smollm2-135m
  : "${DATASETS:=humaneval mbpp}" "${LIMIT:=4}" "${MAX_TOKENS:=384}" "${SOURCE:=reference}" "${NUM_SAMPLES:=2}"
  # the exact ablation matrix costs ~(L+1)/2 forward passes per head: keep the demo's samples short
  : "${SELECT:=all}" "${EXTRA_ANALYSIS_FLAGS:=--sample-max-tokens 256}"
  # a short search: a few generations of 8 candidates (the stage's defaults: pycma's population, 20 generations)
  : "${CMAES_FLAGS:=--popsize 8 --max-generations 4 --control-draws 3}"
  echo "[run_hml] demo on the embedded default $MODEL: $LIMIT problems per dataset; analyses use SOURCE=$SOURCE"
else
  MODEL=$1
  : "${DATASETS:=humaneval mbpp livecodebench}" "${LIMIT:=}" "${MAX_TOKENS:=4096}" "${SOURCE:=generations}"
  : "${SELECT:=correct}" "${NUM_SAMPLES:=}"
fi
: "${N:=1}" "${MODES:=regular chain_code}" "${STAGES:=entropy_lens ablation taylor cmaes_search}"
: "${RESULTS_DIR:=results}" "${BACKEND:=}" "${EXTRA_GEN_FLAGS:=}" "${EXTRA_ANALYSIS_FLAGS:=}" "${CMAES_FLAGS:=}"

common=(--model "$MODEL" --results-dir "$RESULTS_DIR")
for ds in $DATASETS; do
  gen=("${common[@]}" --dataset "$ds" --n "$N" --max-tokens "$MAX_TOKENS")
  [ -n "$LIMIT" ] && gen+=(--limit "$LIMIT")
  [ -n "$BACKEND" ] && gen+=(--backend "$BACKEND")
  if [ "$ds" = livecodebench ] && [ -n "${LCB_DATA_FILE:-}" ]; then gen+=(--data-file "$LCB_DATA_FILE"); fi
  echo "[run_hml] === $ds: generate"
  if ! $PY -m btp.generate "${gen[@]}" $EXTRA_GEN_FLAGS; then
    echo "[run_hml] $ds: generation failed (LiveCodeBench needs the hub or LCB_DATA_FILE); skipping $ds" >&2
    continue
  fi
  echo "[run_hml] === $ds: evaluate"
  $PY -m btp.evaluate "${common[@]}" --dataset "$ds"
  ana=("${common[@]}" --dataset "$ds" --source "$SOURCE" --select "$SELECT")
  [ -n "$NUM_SAMPLES" ] && ana+=(--num-samples "$NUM_SAMPLES")
  for stage in $STAGES; do
    for mode in $MODES; do
      echo "[run_hml] === $ds: $stage ($mode, source=$SOURCE, select=$SELECT)"
      stage_flags=""
      [ "$stage" = cmaes_search ] && stage_flags=$CMAES_FLAGS
      $PY -m "btp.$stage" "${ana[@]}" --mode "$mode" $EXTRA_ANALYSIS_FLAGS $stage_flags
    done
  done
done
echo "[run_hml] done; progress:"
$PY -m btp.check --results-dir "$RESULTS_DIR" || true
