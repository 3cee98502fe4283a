#!/usr/bin/env bash
# ChatRex-JAX on a Cloud TPU VM slice (e.g. v5p-256): create / install / run / logs / stop / delete.
#
#   TPU_NAME=chatrex-v5p ZONE=us-east5-a ACCELERATOR_TYPE=v5p-256 launch/tpu_pod.sh create
#   TPU_NAME=chatrex-v5p ZONE=us-east5-a launch/tpu_pod.sh install
#   TPU_NAME=chatrex-v5p ZONE=us-east5-a CONFIG=chatrex_jax/configs/chatrex_7b.py:stage2 \
#       WORKDIR=gs://my-bucket/chatrex/stage2 launch/tpu_pod.sh run --config.model.init_from=/ckpt/init
#   TPU_NAME=chatrex-v5p ZONE=us-east5-a launch/tpu_pod.sh logs          # worker 0, follow
#   TPU_NAME=chatrex-v5p ZONE=us-east5-a launch/tpu_pod.sh stop          # SIGTERM: final checkpoint
#   TPU_NAME=chatrex-v5p ZONE=us-east5-a launch/tpu_pod.sh delete
#
# Every command that touches the VMs runs on ALL workers (--worker=all): a multi-host JAX
# program must be started on every host of the slice with the same arguments. See
# launch/README.md. DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh COMMAND [ARGS...]

commands:
  aot               ahead-of-time compile check of CONFIG for ACCELERATOR_TYPE, here, no TPU
                    (python -m chatrex_jax.tools.aot; extra ARGS are passed on)
  create            create the TPU VM slice (QUEUED=1: through a queued resource)
  install           copy this checkout (or clone REPO_URL) to every worker, make a venv,
                    pip install -e the project + jax[tpu]
  run [ARGS...]     start `chatrex-jax train --config CONFIG --workdir WORKDIR ARGS...` on all
                    workers in the background (log: LOG, pid: PIDFILE); resumes automatically
                    from the latest checkpoint in WORKDIR
  logs [all]        follow LOG on worker WORKER (default 0); `logs all`: last LINES of every worker
  exec CMD...       run a shell command on all workers
  stop              SIGTERM the trainer on all workers (it saves a final checkpoint and exits)
  status            describe the slice
  delete            delete the slice (QUEUED=1: and its queued resource)

environment (defaults in brackets):
  TPU_NAME          slice name (required)
  ZONE              zone (required for everything but aot), e.g. us-east5-a for v5p
  PROJECT           GCP project [gcloud's default]
  ACCELERATOR_TYPE  [v5p-256]     RUNTIME_VERSION  [from the generation: v2-alpha-tpuv5 for v5p]
  SPOT              1: spot/preemptible capacity [0]    QUEUED  1: queued-resources create [0]
  REPO_URL, BRANCH  clone this repository on the workers; unset: copy this checkout (git ls-files)
  REMOTE_DIR        [chatrex-jax] (relative to the worker's home)   VENV [~/chatrex-venv]
  JAX_TPU           pip requirement for JAX on TPU [jax[tpu]==<local jax version>]
  PIP_EXTRAS        project extras, e.g. "engine" [none]
  CONFIG            [chatrex_jax/configs/chatrex_7b.py:stage2]   WORKDIR  gs://bucket/path (required for run)
  LOG               [~/chatrex_train.log]   PIDFILE [~/chatrex_train.pid]   WORKER [0]  LINES [200]
  DRY_RUN           1: print the commands instead of running them
EOF
}

ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-256}
SPOT=${SPOT:-0}
QUEUED=${QUEUED:-0}
REMOTE_DIR=${REMOTE_DIR:-chatrex-jax}
VENV=${VENV:-'~/chatrex-venv'}
CONFIG=${CONFIG:-chatrex_jax/configs/chatrex_7b.py:stage2}
LOG=${LOG:-'~/chatrex_train.log'}
PIDFILE=${PIDFILE:-'~/chatrex_train.pid'}
WORKER=${WORKER:-0}
LINES=${LINES:-200}
DRY_RUN=${DRY_RUN:-0}
BRANCH=${BRANCH:-main}
PIP_EXTRAS=${PIP_EXTRAS:-}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

default_runtime() {
  case "$1" in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) echo "tpu_pod.sh: no default RUNTIME_VERSION for $1; set RUNTIME_VERSION" >&2; return 1 ;;
  esac
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
need() { for v in "$@"; do [[ -n "${!v:-}" ]] || die "set $v (see: launch/tpu_pod.sh help)"; done; }

# Runs (or with DRY_RUN=1 prints) a command given as separate words.
x() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

gflags() {
  local f=(--zone="$ZONE")
  [[ -n "${PROJECT:-}" ]] && f+=(--project="$PROJECT")
  printf '%s\n' "${f[@]}"
}

# ssh_all CMD: the same shell command on every worker of the slice.
ssh_all() {
  local flags; mapfile -t flags < <(gflags)
  x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" --worker=all --command="$1"
}

cmd_aot() {
  cd "$HERE"
  x python -m chatrex_jax.tools.aot --config "$CONFIG" --topology "$ACCELERATOR_TYPE" "$@"
}

cmd_create() {
  need TPU_NAME ZONE
  local runtime=${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR_TYPE")}
  local flags; mapfile -t flags < <(gflags)
  local spot=(); [[ "$SPOT" == 1 ]] && spot=(--spot)
  if [[ "$QUEUED" == 1 ]]; then
    x gcloud compute tpus queued-resources create "${TPU_NAME}-qr" --node-id="$TPU_NAME" \
      "${flags[@]}" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$runtime" "${spot[@]}"
    echo "queued; watch with: gcloud compute tpus queued-resources describe ${TPU_NAME}-qr --zone=$ZONE"
  else
    x gcloud compute tpus tpu-vm create "$TPU_NAME" "${flags[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$runtime" "${spot[@]}"
  fi
}

cmd_install() {
  need TPU_NAME ZONE
  local flags; mapfile -t flags < <(gflags)
  local jax_tpu=${JAX_TPU:-"jax[tpu]==$(cd "$HERE" && python -c 'import jax; print(jax.__version__)' 2>/dev/null || echo '')"}
  [[ "$jax_tpu" == *"==" ]] && jax_tpu="jax[tpu]"
  local spec="$REMOTE_DIR"; [[ "$spec" == /* || "$spec" == "~"* ]] || spec="./$spec"
  [[ -n "$PIP_EXTRAS" ]] && spec="$spec[$PIP_EXTRAS]"
  if [[ -n "${REPO_URL:-}" ]]; then
    ssh_all "set -e; if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin && git -C $REMOTE_DIR checkout -q $BRANCH && git -C $REMOTE_DIR pull -q --ff-only; else git clone -q --branch $BRANCH $REPO_URL $REMOTE_DIR; fi"
  else
    # This checkout's tracked + untracked-not-ignored files, identical on every worker.
    local tarball; tarball="$(mktemp -d)/chatrex-jax.tar.gz"
    (cd "$HERE" && git ls-files -co --exclude-standard -z | xargs -0 tar -czf "$tarball" --)
    x gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:chatrex-jax.tar.gz" "${flags[@]}" --worker=all
    ssh_all "set -e; rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf chatrex-jax.tar.gz -C $REMOTE_DIR"
  fi
  ssh_all "set -e; python3 -m venv $VENV && $VENV/bin/pip install -q -U pip && $VENV/bin/pip install -q -e '$spec' '$jax_tpu' && $VENV/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.local_device_count())'"
}

cmd_run() {
  need TPU_NAME ZONE WORKDIR
  [[ "$WORKDIR" == gs://* ]] || echo "tpu_pod.sh: warning: WORKDIR=$WORKDIR is not gs://; every worker must see the same directory" >&2
  local extra=""; for a in "$@"; do extra+=" $(printf '%q' "$a")"; done
  # nohup + setsid: the trainer outlives the ssh session; --distributed: jax.distributed.initialize()
  ssh_all "cd $REMOTE_DIR && if [ -f $PIDFILE ] && kill -0 \$(cat $PIDFILE) 2>/dev/null; then echo \"already running (pid \$(cat $PIDFILE))\"; exit 1; fi; setsid nohup $VENV/bin/chatrex-jax train --distributed --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR")$extra > $LOG 2>&1 < /dev/null & echo \$! > $PIDFILE; echo \"\$(hostname): started pid \$(cat $PIDFILE), log $LOG\""
}

cmd_logs() {
  need TPU_NAME ZONE
  local flags; mapfile -t flags < <(gflags)
  if [[ "${1:-}" == all ]]; then
    ssh_all "echo \"== \$(hostname)\"; tail -n $LINES $LOG"
  else
    x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" --worker="$WORKER" --command="tail -n $LINES -F $LOG"
  fi
}

cmd_exec() {
  need TPU_NAME ZONE
  [[ $# -gt 0 ]] || die "exec needs a command"
  ssh_all "$*"
}

cmd_stop() {
  need TPU_NAME ZONE
  ssh_all "if [ -f $PIDFILE ] && kill -0 \$(cat $PIDFILE) 2>/dev/null; then kill -TERM \$(cat $PIDFILE) && echo \"\$(hostname): SIGTERM sent (final checkpoint, then exit)\"; else echo \"\$(hostname): not running\"; fi"
}

cmd_status() {
  need TPU_NAME ZONE
  local flags; mapfile -t flags < <(gflags)
  x gcloud compute tpus tpu-vm describe "$TPU_NAME" "${flags[@]}"
}

cmd_delete() {
  need TPU_NAME ZONE
  local flags; mapfile -t flags < <(gflags)
  if [[ "$QUEUED" == 1 ]]; then
    x gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" "${flags[@]}" --force --quiet
  else
    x gcloud compute tpus tpu-vm delete "$TPU_NAME" "${flags[@]}" --quiet
  fi
}

main() {
  local cmd=${1:-help}; shift || true
  case "$cmd" in
    aot) cmd_aot "$@" ;;
    create) cmd_create ;;
    install) cmd_install ;;
    run) cmd_run "$@" ;;
    logs) cmd_logs "$@" ;;
    exec) cmd_exec "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    delete) cmd_delete ;;
    help|-h|--help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
