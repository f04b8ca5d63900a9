#!/usr/bin/env bash
# Training on a Cloud TPU VM slice (one or many workers), from your machine, with gcloud:
#
#   TPU_NAME=sdit ZONE=us-central2-b ACCELERATOR_TYPE=v4-128 CONFIG=configs/switchdit_xl.py \
#   MOUNT=nfs:10.0.0.2:/runs launch/tpu_pod.sh [STEP] [--config.FIELD=VALUE ...]
#
# STEP: all (default: up, install, run), up (create the slice, or reuse it; a preempted one is
# recreated), install (copy this checkout to every worker and pip-install it with jax[tpu]),
# run (start main on every worker with the same command, in the background), logs (copy every
# worker's log here and show worker 0's tail), stop (SIGTERM: the run saves a checkpoint and
# exits), delete (delete the slice). Further arguments go to switch_dit_jax.main.
# After a preemption, run the script again: it recreates the slice, reinstalls, and main
# resumes from WORKDIR. DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
TPU_NAME=${TPU_NAME:-switch-dit}
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
SPOT=${SPOT:-0}
CONFIG=${CONFIG:-configs/switchdit_b.py}
RUN_NAME=${RUN_NAME:-$(basename "$CONFIG" .py)}
MOUNT=${MOUNT:-}
MOUNT_POINT=${MOUNT_POINT:-/mnt/shared}
WORKDIR=${WORKDIR:-$MOUNT_POINT/runs/$RUN_NAME}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
COORDINATOR_PORT=${COORDINATOR_PORT:-8482}
LIBTPU_INIT_ARGS=${LIBTPU_INIT_ARGS:-}
LOCAL_LOG_DIR=${LOCAL_LOG_DIR:-logs/$TPU_NAME}
TARBALL=${TARBALL:-${TMPDIR:-/tmp}/switch_dit_jax-$TPU_NAME.tar.gz}
# Stand-ins for what a dry run cannot ask gcloud: worker 0's internal IP and the worker count.
WORKER0_IP=${WORKER0_IP:-10.0.0.2}
NUM_WORKERS=${NUM_WORKERS:-1}

# On every worker, relative to its home directory.
REMOTE_REPO=switch_dit_jax
REMOTE_VENV=switch_dit_venv
REMOTE_LOGS=switch_dit_logs

REPO=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "error: $*" >&2; exit 2; }

# A command line as a shell reads it back: plain words bare, others in single quotes.
quote() {
    local word out=()
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+=("$word")
        else
            out+=("'${word//\'/\'\\\'\'}'")
        fi
    done
    echo "${out[*]}"
}

run() {
    if [[ $DRY_RUN == 1 ]]; then quote "$@"; else "$@"; fi
}

tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then where+=(--project="$PROJECT"); fi

ssh_all() {
    run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

step_up() {
    local state=""
    if [[ $DRY_RUN == 1 ]]; then
        echo "# $(quote "${tpu[@]}" describe "$TPU_NAME" "${where[@]}" '--format=value(state)')" \
             "  (dry run: taken as absent; READY is reused, PREEMPTED deleted and recreated)"
    else
        state=$("${tpu[@]}" describe "$TPU_NAME" "${where[@]}" '--format=value(state)' 2>/dev/null) ||
            state=""
    fi
    case $state in
        READY)
            echo "# reusing the TPU slice $TPU_NAME ($ZONE)"
            return ;;
        PREEMPTED | TERMINATED)
            echo "# $TPU_NAME is $state: deleting and recreating it"
            run "${tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet ;;
        "") ;;
        *) die "the TPU slice $TPU_NAME is $state; wait until it is READY or delete it (launch/tpu_pod.sh delete)." ;;
    esac
    local create=("${tpu[@]}" create "$TPU_NAME" "${where[@]}"
                  --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
    if [[ $SPOT == 1 ]]; then create+=(--spot); fi
    run "${create[@]}"
}

step_install() {
    # The working tree as it is (uncommitted edits included), without runs and caches.
    run tar -czf "$TARBALL" --exclude=./.git --exclude=./runs --exclude=./logs \
        --exclude='*.egg-info' --exclude=__pycache__ -C "$REPO" .
    run "${tpu[@]}" scp "$TARBALL" "$TPU_NAME:$REMOTE_REPO.tar.gz" "${where[@]}" --worker=all
    # The TPU images ship Python 3.10; uv provides the 3.11+ this package needs.
    local cmd="set -e; rm -rf \$HOME/$REMOTE_REPO; mkdir -p \$HOME/$REMOTE_REPO"
    cmd+="; tar -xzf \$HOME/$REMOTE_REPO.tar.gz -C \$HOME/$REMOTE_REPO"
    cmd+="; python3 -m pip install --user -q -U uv"
    cmd+="; \$HOME/.local/bin/uv venv -q --allow-existing --python $(quote "$PYTHON_VERSION") \$HOME/$REMOTE_VENV"
    cmd+="; \$HOME/.local/bin/uv pip install -q --python \$HOME/$REMOTE_VENV/bin/python -U $(quote "$JAX_SPEC") -e \$HOME/$REMOTE_REPO"
    case $MOUNT in
        "") ;;
        nfs:*:*)
            local share=${MOUNT#nfs:} mp
            mp=$(quote "$MOUNT_POINT")
            cmd+="; sudo apt-get -qq update && sudo apt-get -qq install -y nfs-common"
            cmd+="; sudo mkdir -p $mp; mountpoint -q $mp || sudo mount -t nfs -o rw,hard $(quote "$share") $mp"
            ;;
        *) die "MOUNT=$MOUNT must be empty or nfs:HOST:/EXPORT (e.g. a Filestore share)." ;;
    esac
    ssh_all "$cmd"
}

# gcloud's answer to `describe --format=value(FIELD)`; a dry run prints the query and answers
# with the stand-in $2.
describe() {
    local query=("${tpu[@]}" describe "$TPU_NAME" "${where[@]}" "--format=value($1)")
    if [[ $DRY_RUN == 1 ]]; then
        echo "# $(quote "${query[@]}")   (dry run: taken as '$2')"
        answer=$2
    else
        answer=$("${query[@]}")
    fi
}

step_run() {
    local ip wd log pid check main cmd answer
    describe "networkEndpoints[0].ipAddress" "$WORKER0_IP"  # worker 0 is jax's process 0
    ip=$answer
    [[ -n $ip ]] || die "gcloud reported no internal IP for worker 0 of $TPU_NAME; is it READY (launch/tpu_pod.sh up)?"
    wd=$(quote "$WORKDIR")
    # Every worker writes checkpoints into the one WORKDIR: worker 0 leaves a file there and
    # every worker must see it, or nothing starts.
    check="$WORKDIR/.shared_check_$TPU_NAME"
    run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=0 \
        --command="mkdir -p $wd && touch $(quote "$check") || { echo \"error: cannot create WORKDIR=$WORKDIR on worker 0; mount shared storage there (MOUNT=nfs:HOST:/EXPORT) or set WORKDIR.\" >&2; exit 3; }"
    ssh_all "test -f $(quote "$check") || { echo \"error: \$(hostname) cannot see WORKDIR=$WORKDIR; put it on storage every worker mounts (MOUNT=nfs:HOST:/EXPORT).\" >&2; exit 3; }"
    log="\$HOME/$REMOTE_LOGS/$RUN_NAME.log"
    pid="\$HOME/$REMOTE_LOGS/$RUN_NAME.pid"
    # An explicit coordinator makes main call jax.distributed.initialize(); jax reads the process
    # count and this worker's id from the TPU metadata.
    main="\$HOME/$REMOTE_VENV/bin/python -m switch_dit_jax.main $(quote "--config=$CONFIG" \
        "--workdir=$WORKDIR" "--coordinator_address=$ip:$COORDINATOR_PORT" "$@")"
    cmd="cd \$HOME/$REMOTE_REPO && mkdir -p \$HOME/$REMOTE_LOGS"
    cmd+=" && if [ -f $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then echo \"error: \$(hostname) already runs $RUN_NAME (launch/tpu_pod.sh stop first).\" >&2; exit 4; fi"
    if [[ -n $LIBTPU_INIT_ARGS ]]; then cmd+=" && export LIBTPU_INIT_ARGS=$(quote "$LIBTPU_INIT_ARGS")"; fi
    cmd+=" && { nohup $main > $log 2>&1 < /dev/null & echo \$! > $pid; }"
    ssh_all "$cmd"
    echo "# started $RUN_NAME on every worker of $TPU_NAME; logs: launch/tpu_pod.sh logs"
}

step_logs() {
    local n i answer ips
    describe "networkEndpoints[].ipAddress" "$(seq -s ';' "$NUM_WORKERS" | sed 's/[0-9]*/ip/g')"
    IFS=';' read -r -a ips <<<"$answer"
    n=${#ips[@]}
    run mkdir -p "$LOCAL_LOG_DIR"
    for ((i = 0; i < n; i++)); do
        run "${tpu[@]}" scp "$TPU_NAME:$REMOTE_LOGS/$RUN_NAME.log" "$LOCAL_LOG_DIR/worker_$i.log" \
            "${where[@]}" --worker="$i"
    done
    run tail -n 30 "$LOCAL_LOG_DIR/worker_0.log"
}

step_stop() {
    local pid="\$HOME/$REMOTE_LOGS/$RUN_NAME.pid"
    ssh_all "if [ -f $pid ]; then kill -TERM \"\$(cat $pid)\" 2>/dev/null || true; fi"
    echo "# sent SIGTERM: each worker saves the checkpoint and exits"
}

step=all
case ${1:-} in
    all | up | install | run | logs | stop | delete) step=$1; shift ;;
    "" | --*) ;;
    *) die "unknown step '$1'; use all, up, install, run, logs, stop or delete." ;;
esac
cd "$REPO"
if [[ $step == all || $step == run ]]; then
    [[ -f $CONFIG ]] || die "CONFIG=$CONFIG does not exist; pass a file under configs/ (relative to the repository)."
fi
if [[ $DRY_RUN != 1 ]]; then
    command -v gcloud >/dev/null || die "gcloud is not installed; see https://cloud.google.com/sdk/docs/install."
fi

case $step in
    all) step_up; step_install; step_run "$@" ;;
    up) step_up ;;
    install) step_install ;;
    run) step_run "$@" ;;
    logs) step_logs ;;
    stop) step_stop ;;
    delete) run "${tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet ;;
esac
