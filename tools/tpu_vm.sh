#!/usr/bin/env bash
# Runs vrl_jax on a Cloud TPU VM with gcloud: create it, install this checkout, train, fetch, delete.
#
#   tools/tpu_vm.sh create  NAME [--zone Z] [--type v5litepod-8] [--version v2-alpha-tpuv5-lite] [--spot]
#   tools/tpu_vm.sh setup   NAME [--zone Z]        copy this checkout (git ls-files) and pip install it with jax[tpu]
#   tools/tpu_vm.sh train   NAME [--zone Z] -- ARGS...   python -m vrl_jax.train ARGS in the background (nohup,
#                                                  log in ~/vrl_jax/train.log); rerunning resumes from checkpoints
#   tools/tpu_vm.sh ssh     NAME [--zone Z] -- CMD      any command in ~/vrl_jax
#   tools/tpu_vm.sh fetch   NAME WORKDIR [--zone Z]      copy a workdir back (checkpoints excluded)
#   tools/tpu_vm.sh delete  NAME [--zone Z]
#
# DRY_RUN=1 prints the gcloud commands instead of running them. The training loop runs in one process
# (all the chips of one host: v4-8, v5litepod-8, v6e-8); multi-host slices run the train step
# (tests/test_multihost.py) but not yet the rollout loop, so the script targets worker 0 only.
# Preemptible (--spot) VMs send SIGTERM before they go: the trainer saves a checkpoint and exits, and
# `train` again resumes it.
set -euo pipefail

usage() { sed -n '2,16p' "$0"; exit 2; }
[ $# -ge 2 ] || usage
CMD=$1; NAME=$2; shift 2
ZONE=${ZONE:-us-central1-a}; TYPE=v5litepod-8; VERSION=v2-alpha-tpuv5-lite; SPOT=""; REST=(); WORKDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --zone) ZONE=$2; shift 2 ;;
    --type) TYPE=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --spot) SPOT="--spot"; shift ;;
    --) shift; REST=("$@"); break ;;
    -*) echo "tools/tpu_vm.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$WORKDIR" ] && WORKDIR=$1 || { echo "tools/tpu_vm.sh: unexpected argument $1" >&2; usage; }; shift ;;
  esac
done

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
remote() {  # remote COMMAND-STRING
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker 0 --command "$1"
}
quote() { printf '%q ' "$@"; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
case "$CMD" in
  create)
    run gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION" $SPOT ;;
  setup)
    if [ "${DRY_RUN:-0}" = 1 ]; then ARCHIVE="${TMPDIR:-/tmp}/vrl_jax.XXXXXX.tar.gz"; else ARCHIVE=$(mktemp -t vrl_jax.XXXXXX.tar.gz); fi
    run tar -C "$ROOT" -czf "$ARCHIVE" $(cd "$ROOT" && git ls-files)
    run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:~/vrl_jax.tar.gz" --zone "$ZONE" --worker 0
    remote 'mkdir -p ~/vrl_jax && tar -C ~/vrl_jax -xzf ~/vrl_jax.tar.gz && cd ~/vrl_jax && pip install -U "jax[tpu]" -e .' ;;
  train)
    [ ${#REST[@]} -gt 0 ] || { echo "tools/tpu_vm.sh train: give the trainer's arguments after --" >&2; exit 2; }
    remote "cd ~/vrl_jax && nohup python -m vrl_jax.train $(quote "${REST[@]}")>> train.log 2>&1 &" ;;
  ssh)
    remote "cd ~/vrl_jax && $(quote "${REST[@]}")" ;;
  fetch)
    [ -n "$WORKDIR" ] || { echo "tools/tpu_vm.sh fetch: name the workdir to copy back" >&2; exit 2; }
    remote "cd ~/vrl_jax && tar --exclude=checkpoints -czf fetch.tar.gz $(quote "$WORKDIR")"
    run gcloud compute tpus tpu-vm scp "$NAME:~/vrl_jax/fetch.tar.gz" fetch.tar.gz --zone "$ZONE" --worker 0
    run tar -xzf fetch.tar.gz ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$NAME" --zone "$ZONE" --quiet ;;
  *) usage ;;
esac
