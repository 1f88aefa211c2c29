#!/usr/bin/env bash
# Pruned inference over a grid: selection methods x fractions removed, each against SEEDS random controls of the
# same per-layer counts and the unpruned model, per dataset. Resumable: btp.pruned skips finished arms, so a
# rerun after a kill (or with more FRACTIONS) only does what is missing. The analyses must exist (btp.taylor,
# btp.ablation, btp.cmaes_search) for the methods asked.
#
#   scripts/run_pruned_sweep.sh MODEL
#
# Knobs (environment): DATASETS (default mbpp), METHODS (default "taylor ablation"; also cmaes), FRACTIONS
# (percent, default "5 10 20"), SEEDS (controls, default 3), LIMIT, N, MAX_TOKENS, BACKEND, RESULTS_DIR,
# EXTRA_FLAGS (passed to every run, e.g. "--source generations --select correct").
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: scripts/run_pruned_sweep.sh MODEL}
PY=${PYTHON:-.venv/bin/python}
: "${DATASETS:=mbpp}" "${METHODS:=taylor ablation}" "${FRACTIONS:=5 10 20}" "${SEEDS:=3}" "${LIMIT:=}" "${N:=1}"
: "${MAX_TOKENS:=512}" "${BACKEND:=auto}" "${RESULTS_DIR:=results}" "${EXTRA_FLAGS:=}"

settings=()
for m in $METHODS; do
  if [ "$m" = cmaes ]; then settings+=("cmaes:best"); continue; fi
  for f in $FRACTIONS; do settings+=("$m:$f%"); done
done
list=$(IFS=,; echo "${settings[*]}")
for ds in $DATASETS; do
  args=(--model "$MODEL" --dataset "$ds" --settings "$list" --controls "$SEEDS" --n "$N" --max-tokens "$MAX_TOKENS"
        --backend "$BACKEND" --results-dir "$RESULTS_DIR")
  [ -n "$LIMIT" ] && args+=(--limit "$LIMIT")
  echo "[run_pruned_sweep] === $ds: $list (x $SEEDS controls)"
  # shellcheck disable=SC2086  (EXTRA_FLAGS is a list of flags)
  $PY -m btp.pruned "${args[@]}" $EXTRA_FLAGS
done
