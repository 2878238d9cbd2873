#!/usr/bin/env bash
# Runs the DyME ablation (experiments/ablation.py) and renders its report.
#   tools/ablation.sh [ROOT] [PARALLEL]     ROOT defaults to workdirs/ablation, PARALLEL to 2
# Each arm is an ordinary `python -m vrl_jax.train` run in ROOT/ALGO-SEED; rerunning the script resumes
# unfinished runs and skips finished ones (a run is finished when its workdir holds export/).
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
ROOT=${1:-workdirs/ablation}
PARALLEL=${2:-2}
SEEDS=${SEEDS:-"0 1 2"}
ALGOS=${ALGOS:-"sft grpo sft_grpo dyme"}
CONFIG=experiments/ablation.py
DRY=${DRY_RUN:-0}
[ "$DRY" = 1 ] || mkdir -p "$ROOT"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$ROOT/jax_cache}

run() {  # run VARIANT WORKDIR [OVERRIDES...]
  if [ "$DRY" = 1 ]; then printf '%q ' python -m vrl_jax.train --config "$CONFIG:$1" --workdir "$2" "${@:3}"; echo; return; fi
  if [ -d "$2/export" ]; then echo "done already: $2"; return; fi
  echo "start $1 -> $2"
  python -m vrl_jax.train --config "$CONFIG:$1" --workdir "$2" "${@:3}" > "$2.log" 2>&1 \
    || { echo "FAILED: $1 (see $2.log)"; return 0; }
  echo "done $1: $(grep -a 'Test_iid Set Epoch Accuracy pass@1 Temperature=0.6' "$2.log" | tail -1)"
}

run start "$ROOT/start"
[ "$DRY" = 1 ] || [ -d "$ROOT/start/export" ] || { echo "the shared start did not finish: see $ROOT/start.log"; exit 1; }
arm() { run "$1,$2" "$ROOT/$1-$2" --config.model.path="$ROOT/start/export"; }  # arm ALGO SEED
jobs_running=0
for s in $SEEDS; do for a in $ALGOS; do
  if [ "$DRY" = 1 ]; then arm "$a" "$s"; continue; fi  # in order: printed lines would interleave
  arm "$a" "$s" &
  jobs_running=$((jobs_running + 1))
  if [ "$jobs_running" -ge "$PARALLEL" ]; then wait -n; jobs_running=$((jobs_running - 1)); fi
done; done
wait
REPORT=(python -m vrl_jax.report --workdir "$ROOT/start")
for a in $ALGOS; do for s in $SEEDS; do REPORT+=("$ROOT/$a-$s"); done; done
REPORT+=(--out "$ROOT/report")
if [ "$DRY" = 1 ]; then printf '%q ' "${REPORT[@]}"; echo; else "${REPORT[@]}"; fi
