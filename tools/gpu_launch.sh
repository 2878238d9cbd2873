#!/usr/bin/env bash
# Runs vrl_jax on several GPU nodes: one program on every host. Every process runs the same
# `python -m vrl_jax.train ARGS` with the same --workdir (a shared filesystem or gs://); vrl_jax.train joins them with
# jax.distributed. Three ways to start them:
#
#   tools/gpu_launch.sh env [--coordinator HOST[:PORT]] [--num-nodes N] [--node-rank R] -- ARGS...
#        once on every node (by hand or from any scheduler): exports JAX_COORDINATOR_ADDRESS (node 0's HOST:PORT,
#        port 12345 if none), JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=R and execs the trainer, which uses all the
#        node's GPUs. The values may come from the environment instead: COORDINATOR, NUM_NODES, NODE_RANK.
#   tools/gpu_launch.sh hosts --hosts H0,H1,... [--port 12345] [--dir PATH] -- ARGS...
#        from one machine over ssh: `env` on every host (rank i on the i-th host, H0 the coordinator) in PATH (default
#        this checkout's path, as on a shared filesystem); prefixes every line with [rank host] and waits for all.
#        Ctrl-C (or SIGTERM) sends SIGTERM to every trainer: each saves a checkpoint and exits.
#   tools/gpu_launch.sh slurm [--nodes N] [--gpus-per-node G] [--per-gpu] [--time T] [--partition P] [--sbatch OPT]...
#                             -- ARGS...
#        submits a batch job (the script on sbatch's stdin) whose srun starts one process per node that sees the
#        node's G GPUs (JAX_LOCAL_DEVICE_IDS=0..G-1), or with --per-gpu one process per GPU; jax reads the rest from
#        SLURM's variables. SIGTERM 120 s before the time limit saves a checkpoint; submitting again resumes.
#
# PYTHON (default python) is the interpreter. DRY_RUN=1 prints what would run instead: the env-prefixed command,
# the ssh commands, or the batch script as an sbatch here-document. Mistakes exit 2.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" >&2; exit 2; }  # the header above
[ $# -ge 1 ] || usage
MODE=$1; shift
fail() { echo "tools/gpu_launch.sh $MODE: $1" >&2; exit 2; }
PYTHON=${PYTHON:-python}; DRY=${DRY_RUN:-0}; ROOT=$(cd "$(dirname "$0")/.." && pwd)
COORD=${COORDINATOR:-}; NUM=${NUM_NODES:-}; RANK=${NODE_RANK:-}; PORT=12345; HOSTLIST=""; DIR=$ROOT
NODES=1; GPUS=8; PER_GPU=0; SBATCH=(); REST=()
while [ $# -gt 0 ]; do
  case "$1" in --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;; esac  # --opt=value -> --opt value
  case "$1" in
    --per-gpu) PER_GPU=1; shift; continue ;;
    --) shift; REST=("$@"); break ;;
    --*) [ $# -ge 2 ] || fail "$1 needs a value" ;;
    *) fail "unexpected argument $1 (the trainer's arguments go after --)" ;;
  esac
  case "$1" in
    --coordinator) COORD=$2 ;;
    --num-nodes) NUM=$2 ;;
    --node-rank) RANK=$2 ;;
    --hosts) HOSTLIST=$2 ;;
    --port) PORT=$2 ;;
    --dir) DIR=$2 ;;
    --nodes) NODES=$2 ;;
    --gpus-per-node) GPUS=$2 ;;
    --time) SBATCH+=("--time=$2") ;;
    --partition) SBATCH+=("--partition=$2") ;;
    --sbatch) SBATCH+=("$2") ;;
    *) fail "unknown option $1 (see tools/gpu_launch.sh with no arguments)" ;;
  esac
  shift 2
done
[ ${#REST[@]} -gt 0 ] || fail "give the trainer's arguments after -- (the same for every process)"
TRAIN=("$PYTHON" -m vrl_jax.train "${REST[@]}")
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || fail "$1 takes a positive whole number, not '$2'"; }
quote() { printf '%q ' "$@"; }
pidfile() { echo "\"\${TMPDIR:-/tmp}/vrl_jax.train.$1.pid\""; }  # on the remote host, for rank $1

case "$MODE" in
  env)
    [ -n "$COORD" ] || fail "give node 0's address: --coordinator HOST[:PORT] or COORDINATOR=HOST[:PORT]"
    [ -n "$NUM" ] || fail "give the number of nodes: --num-nodes N or NUM_NODES=N"
    [ -n "$RANK" ] || fail "give this node's rank: --node-rank R or NODE_RANK=R (0 on the coordinator's node)"
    positive "the number of nodes" "$NUM"
    [[ "$RANK" =~ ^[0-9]+$ ]] && [ "$RANK" -lt "$NUM" ] || fail "the node rank is 0..$((NUM - 1)), not '$RANK'"
    [[ "$COORD" == *:* ]] || COORD=$COORD:$PORT
    positive "the coordinator's port" "${COORD##*:}"
    CMDLINE=(env JAX_COORDINATOR_ADDRESS="$COORD" JAX_NUM_PROCESSES="$NUM" JAX_PROCESS_ID="$RANK" "${TRAIN[@]}")
    if [ "$DRY" = 1 ]; then quote "${CMDLINE[@]}"; echo; else exec "${CMDLINE[@]}"; fi ;;
  hosts)
    IFS=, read -r -a HOSTS <<< "$HOSTLIST"
    [ ${#HOSTS[@]} -gt 0 ] || fail "give the hosts: --hosts H0,H1,... (H0 runs the coordinator)"
    positive "--port" "$PORT"
    COORD=${HOSTS[0]#*@}:$PORT  # user@host -> host
    PIDS=(); STOPPED=0
    stop_all() {
      STOPPED=$((STOPPED + 1))  # a count: every trap, even a second Ctrl-C, interrupts wait
      echo "tools/gpu_launch.sh: SIGTERM to every trainer (each saves a checkpoint and exits)" >&2
      for i in "${!HOSTS[@]}"; do ssh "${HOSTS[i]}" "kill -TERM \$(cat $(pidfile "$i"))" || true; done
    }
    [ "$DRY" = 1 ] || trap stop_all INT TERM
    for i in "${!HOSTS[@]}"; do
      # exec keeps the shell's pid through to the trainer, so the pid file names the trainer for stop_all.
      REMOTE="cd $(quote "$DIR")&& echo \$\$ > $(pidfile "$i") && exec env PYTHON=$(quote "$PYTHON")"
      REMOTE+="tools/gpu_launch.sh env --coordinator $COORD --num-nodes ${#HOSTS[@]} --node-rank $i -- $(quote "${REST[@]}")"
      if [ "$DRY" = 1 ]; then quote ssh "${HOSTS[i]}" "$REMOTE"; echo; continue; fi
      ( ssh "${HOSTS[i]}" "$REMOTE" 2>&1 | while IFS= read -r line; do printf '[%s %s] %s\n' "$i" "${HOSTS[i]}" "$line"; done ) &
      PIDS+=($!)
    done
    RC=0
    for p in "${PIDS[@]}"; do
      while :; do  # the trap interrupts wait (status > 128): wait again for that launcher's own status
        TRAPPED=$STOPPED; wait "$p" && S=0 || S=$?
        [ "$STOPPED" != "$TRAPPED" ] || break
      done
      [ "$S" = 0 ] || RC=$S
    done
    exit "$RC" ;;
  slurm)
    positive "--nodes" "$NODES"; positive "--gpus-per-node" "$GPUS"
    if [ "$PER_GPU" = 1 ]; then TASKS=$GPUS; else TASKS=1; fi
    SCRIPT="#!/bin/bash
#SBATCH --job-name=vrl_jax
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$TASKS
#SBATCH --gpus-per-node=$GPUS
#SBATCH --signal=TERM@120
"
    for o in "${SBATCH[@]}"; do SCRIPT+="#SBATCH $o
"; done
    SCRIPT+="set -euo pipefail
cd $(quote "$ROOT")
"
    if [ "$PER_GPU" = 0 ]; then
      # jax under SLURM gives each process the one GPU numbered SLURM_LOCALID unless told otherwise.
      SCRIPT+="export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS - 1)))
"
    fi
    # --kill-on-bad-exit: a process that dies takes the others down instead of leaving them hung in a collective.
    SCRIPT+="srun --label --kill-on-bad-exit=1 $(quote "${TRAIN[@]}")"
    if [ "$DRY" = 1 ]; then printf "sbatch <<'EOF'\n%s\nEOF\n" "$SCRIPT"; else sbatch <<< "$SCRIPT"; fi ;;
  *) echo "tools/gpu_launch.sh: unknown mode $MODE (env, hosts or slurm)" >&2; usage ;;
esac
