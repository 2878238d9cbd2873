#!/usr/bin/env bash
# Runs vrl_jax on a Cloud TPU VM or a multi-host TPU slice with gcloud: one program on every host. Every worker runs
# the same `python3 -m vrl_jax.train` command; vrl_jax.train joins them with jax.distributed (read from the TPU
# metadata), so the commands that touch the VM run on every worker (--worker=all) unless --worker N picks one.
#
#   tools/tpu_vm.sh create NAME [--type v5litepod-8] [--version V] [--spot | --reserved] [--queued]
#        --queued asks for a queued resource (named NAME, node NAME) instead of creating the VM at once; the
#        runtime version follows the type unless --version is given (cloud.google.com/tpu/docs/runtimes):
#        v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5litepod/v5e v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base
#   tools/tpu_vm.sh status NAME        the queued resource's state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, ...)
#   tools/tpu_vm.sh wait   NAME        poll it every $POLL_S s (60) until ACTIVE; exit 1 if it is FAILED or SUSPENDED
#   tools/tpu_vm.sh setup  NAME        copy this checkout (git ls-files) to every worker, pip install it with jax[tpu]
#   tools/tpu_vm.sh train  NAME -- ARGS...  on every worker: stop an earlier vrl_jax.train and remove libtpu's lock,
#        then python3 -m vrl_jax.train ARGS in the background, log in ~/vrl_jax/train.<worker>.log; again = resume
#   tools/tpu_vm.sh stop   NAME        stop vrl_jax.train on every worker (SIGTERM saves a checkpoint) and clean up
#   tools/tpu_vm.sh logs   NAME [--lines N] [--follow] [--to DIR]   tail every worker's log, or copy them all to DIR
#   tools/tpu_vm.sh ssh    NAME [-- CMD]   CMD in ~/vrl_jax on every worker (without CMD: a shell on worker 0)
#   tools/tpu_vm.sh fetch  NAME WORKDIR [--to DIR]   copy a workdir back without checkpoints/: a gs:// workdir with
#        gcloud storage rsync, a local one as a tar over ssh from worker 0 (where process 0 writes)
#   tools/tpu_vm.sh delete NAME [--queued]   (--queued: the queued resource and its VM)
#
# Options anywhere after NAME: --zone Z (default $ZONE or us-central1-a), --worker all|N. A gs:// workdir is passed
# to the trainer unchanged; use one on multi-host slices (every host writes its checkpoint shards there).
# DRY_RUN=1 prints the gcloud commands instead of running them. Spot VMs send SIGTERM before they go: the trainer
# saves a checkpoint and exits, and `train` again (on a new VM: create, setup, train) resumes it. Mistakes exit 2.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" >&2; exit 2; }  # the header above
fail() { echo "tools/tpu_vm.sh $CMD: $1" >&2; exit 2; }
[ $# -ge 2 ] || usage
CMD=$1; NAME=$2; shift 2
case "$CMD" in create|status|wait|setup|train|stop|logs|ssh|fetch|delete) ;;
  *) echo "tools/tpu_vm.sh: unknown command $CMD" >&2; usage ;; esac
case "$NAME" in -*) fail "give the TPU's NAME before the options (got $NAME)" ;; esac
ZONE=${ZONE:-us-central1-a}; TYPE=v5litepod-8; VERSION=""; PRICING=""; QUEUED=0; WORKER=""; REST=(); WORKDIR=""
LINES=50; FOLLOW=0; TO=""; POLL_S=${POLL_S:-60}; STOP_WAIT_S=${STOP_WAIT_S:-60}
while [ $# -gt 0 ]; do
  case "$1" in --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;; esac  # --opt=value -> --opt value
  case "$1" in
    --zone|--type|--version|--worker|--lines|--to) [ $# -ge 2 ] || fail "$1 needs a value" ;;
  esac
  case "$1" in
    --zone) ZONE=$2; shift 2 ;;
    --type) TYPE=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --worker) WORKER=$2; shift 2 ;;
    --lines) LINES=$2; shift 2 ;;
    --to) TO=$2; shift 2 ;;
    --spot|--reserved) [ -z "$PRICING" ] || [ "$PRICING" = "$1" ] || fail "--spot and --reserved exclude each other"
                       PRICING=$1; shift ;;
    --queued) QUEUED=1; shift ;;
    --follow) FOLLOW=1; shift ;;
    --) shift; REST=("$@"); break ;;
    -*) fail "unknown option $1 (see tools/tpu_vm.sh with no arguments)" ;;
    *) [ -z "$WORKDIR" ] || fail "unexpected argument $1"; WORKDIR=$1; shift ;;
  esac
done
[ -z "$WORKDIR" ] || [ "$CMD" = fetch ] || fail "unexpected argument $WORKDIR (the trainer's arguments go after --)"
[[ "$WORKER" =~ ^(all|[0-9]+)?$ ]] || fail "--worker takes all or a worker number, not '$WORKER'"
[[ "$LINES" =~ ^[0-9]+$ ]] || fail "--lines takes a number, not '$LINES'"
[[ "$POLL_S" =~ ^[0-9]+$ && "$STOP_WAIT_S" =~ ^[0-9]+$ ]] || fail "POLL_S and STOP_WAIT_S are whole seconds"

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
quote() { printf '%q ' "$@"; }
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
remote() {  # remote COMMAND-STRING: on the chosen workers (default all)
  run "${TPU[@]}" ssh "$NAME" --zone "$ZONE" --worker="${WORKER:-all}" --command "$1"
}

# The runtime version for a type (cloud.google.com/tpu/docs/runtimes, "TPU software versions": PyTorch and JAX).
runtime_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v4-*|v3-*|v2-*) echo tpu-ubuntu2204-base ;;
    *) fail "no runtime version known for --type $1 (v6e-N, v5p-N, v5litepod-N, v4-N, v3-N, v2-N); give --version" ;;
  esac
}

# Stops an earlier run on a worker: SIGTERM (the trainer saves a checkpoint and exits), SIGKILL after STOP_WAIT_S s
# (a process hung in a collective whose peer died never exits by itself). Then it removes libtpu's lock file, which
# a killed process leaves behind and which makes the next start fail with "TPU in use", and /tmp/tpu_logs when a
# run as another user (root, docker) made it unwritable to us. The pattern matches the python process only: the
# remote shell running this line has "vrl_jax.train" in its own command line and must not kill itself.
STOP='P="^[^ ]*python[0-9.]* -m vrl_jax[.]train( |$)"; pkill -TERM -f "$P"; '
STOP+="for _ in \$(seq $STOP_WAIT_S); do pgrep -f \"\$P\" >/dev/null || break; sleep 1; done; "
STOP+='pkill -KILL -f "$P" && sleep 2; rm -f /tmp/libtpu_lockfile 2>/dev/null || sudo -n rm -f /tmp/libtpu_lockfile; '
STOP+='[ ! -e /tmp/tpu_logs ] || [ -w /tmp/tpu_logs ] || sudo -n rm -rf /tmp/tpu_logs'
# The worker's number in its slice (the process id jax.distributed gives it), as jax reads it from the metadata.
WORKER_ID='W=${TPU_WORKER_ID:-$(curl -sf -m 5 -H Metadata-Flavor:Google '
WORKER_ID+='http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)}'

ROOT=$(cd "$(dirname "$0")/.." && pwd)
case "$CMD" in
  create)
    VERSION=${VERSION:-$(runtime_version "$TYPE")}
    if [ "$QUEUED" = 1 ]; then
      run "${QR[@]}" create "$NAME" --node-id "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" \
        --runtime-version "$VERSION" $PRICING
    else
      run "${TPU[@]}" create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION" $PRICING
    fi ;;
  status)
    run "${QR[@]}" describe "$NAME" --zone "$ZONE" --format 'value(state.state)' ;;
  wait)
    if [ "${DRY_RUN:-0}" = 1 ]; then run "${QR[@]}" describe "$NAME" --zone "$ZONE" --format 'value(state.state)'; exit 0; fi
    while :; do
      STATE=$("${QR[@]}" describe "$NAME" --zone "$ZONE" --format 'value(state.state)')
      echo "$(date -u +%H:%M:%S) $NAME: $STATE"
      case "$STATE" in
        ACTIVE) exit 0 ;;
        FAILED|SUSPENDED|SUSPENDING) echo "tools/tpu_vm.sh wait: $NAME is $STATE; delete it (delete $NAME --queued) and create it again" >&2; exit 1 ;;
      esac
      sleep "$POLL_S"
    done ;;
  setup)
    if [ "${DRY_RUN:-0}" = 1 ]; then ARCHIVE="${TMPDIR:-/tmp}/vrl_jax.XXXXXX.tar.gz"; else ARCHIVE=$(mktemp -t vrl_jax.XXXXXX.tar.gz); fi
    run tar -C "$ROOT" -czf "$ARCHIVE" $(cd "$ROOT" && git ls-files)
    run "${TPU[@]}" scp "$ARCHIVE" "$NAME:~/vrl_jax.tar.gz" --zone "$ZONE" --worker="${WORKER:-all}"
    remote 'mkdir -p ~/vrl_jax && tar -C ~/vrl_jax -xzf ~/vrl_jax.tar.gz && cd ~/vrl_jax && python3 -m pip install -U "jax[tpu]" -e .' ;;
  train)
    [ ${#REST[@]} -gt 0 ] || fail "give the trainer's arguments after -- (the same on every worker)"
    TRAIN="python3 -m vrl_jax.train $(quote "${REST[@]}")"
    remote "cd ~/vrl_jax || exit 1; $STOP; $WORKER_ID; echo \"== \$(date -u) worker \$W: $TRAIN\" >> train.\$W.log; nohup $TRAIN>> train.\$W.log 2>&1 < /dev/null &" ;;
  stop)
    remote "$STOP" ;;
  logs)
    if [ -n "$TO" ]; then
      [ "$FOLLOW" = 0 ] || fail "--follow tails the logs; --to copies them: give one"
      run mkdir -p "$TO"
      run "${TPU[@]}" scp "$NAME:~/vrl_jax/train.*.log" "$TO" --zone "$ZONE" --worker="${WORKER:-all}"
    else
      FLAGS="-n $LINES"; [ "$FOLLOW" = 0 ] || FLAGS+=" -F"
      remote "cd ~/vrl_jax && tail $FLAGS train.*.log"  # tail names each file: ==> train.<worker>.log <==
    fi ;;
  ssh)
    if [ ${#REST[@]} -eq 0 ]; then
      [ "${WORKER:-0}" != all ] || fail "an interactive shell opens on one worker: give --worker N or a command after --"
      run "${TPU[@]}" ssh "$NAME" --zone "$ZONE" --worker="${WORKER:-0}"
    else
      remote "cd ~/vrl_jax && $(quote "${REST[@]}")"
    fi ;;
  fetch)
    [ -n "$WORKDIR" ] || fail "name the workdir to copy back"
    if [[ "$WORKDIR" == gs://* ]]; then
      SRC=${WORKDIR%/}; DEST=${SRC#gs://}; [[ "$DEST" == */* ]] && DEST=${DEST#*/}  # gs://bucket/runs/a -> runs/a
      DEST=${TO:-$DEST}
      run mkdir -p "$DEST"
      run gcloud storage rsync --recursive --exclude '^checkpoints/.*' "$SRC" "$DEST"
    else
      [ "${WORKER:-0}" != all ] || fail "a local workdir is fetched from one worker (process 0 writes it on worker 0)"
      WORKER=${WORKER:-0}
      remote "cd ~/vrl_jax && tar --exclude=checkpoints -czf fetch.tar.gz $(quote "$WORKDIR")"
      run "${TPU[@]}" scp "$NAME:~/vrl_jax/fetch.tar.gz" fetch.tar.gz --zone "$ZONE" --worker="$WORKER"
      [ -z "$TO" ] || run mkdir -p "$TO"
      run tar -C "${TO:-.}" -xzf fetch.tar.gz
    fi ;;
  delete)
    if [ "$QUEUED" = 1 ]; then
      run "${QR[@]}" delete "$NAME" --zone "$ZONE" --force --quiet
    else
      run "${TPU[@]}" delete "$NAME" --zone "$ZONE" --quiet
    fi ;;
esac
