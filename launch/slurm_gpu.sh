#!/usr/bin/env bash
# Training on a SLURM GPU cluster: submit from the repository root with
#
#   CONFIG=configs/switchdit_xl.py WORKDIR=/shared/runs/sdit_xl sbatch --nodes=8 launch/slurm_gpu.sh
#
# Arguments after the script go to switch_dit_jax.main (e.g. --config.train.num_steps=400000).
# One process per GPU (PROCESS_PER=gpu, the default) or per node (PROCESS_PER=node). Near the
# time limit SLURM sends USR1 (--signal below): the training processes get SIGTERM, save a
# checkpoint and exit, and the job requeues itself; the requeued job resumes from WORKDIR. A preempted job (SIGTERM from SLURM) saves the same way and is
# requeued by SLURM (--requeue). DRY_RUN=1 prints the commands instead of running them; outside
# an allocation, give it SLURM_JOB_ID, SLURM_JOB_NODELIST and SLURM_JOB_NUM_NODES.
#
#SBATCH --job-name=switch-dit
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
CONFIG=${CONFIG:-configs/switchdit_b.py}
JOB_NAME=${SLURM_JOB_NAME:-switch-dit}
WORKDIR=${WORKDIR:-$HOME/switch_dit_runs/$JOB_NAME}
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-}
PROCESS_PER=${PROCESS_PER:-gpu}
NODELIST=${NODELIST:-${SLURM_JOB_NODELIST:-}}
NUM_NODES=${NUM_NODES:-${SLURM_JOB_NUM_NODES:-}}
gpus_on_node=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${gpus_on_node##*:}}  # "h100:8" -> 8
JOB_ID=${SLURM_JOB_ID:-}
# jax's own SLURM default: one port per job, so jobs that share a node do not collide.
COORDINATOR_PORT=${COORDINATOR_PORT:-$((61440 + ${JOB_ID:-0} % 4096))}
MAX_REQUEUES=${MAX_REQUEUES:-20}
CPUS_PER_TASK=${CPUS_PER_TASK:-}
# Latency hiding overlaps the gradient all-reduce (or, with mesh.fsdp > 1, the parameter
# all-gathers and gradient reduce-scatters) with the backward pass; combining collectives up to
# 128 MiB sends a DiT's 30-700 M parameters in a few large NCCL calls instead of many small ones.
gpu_flags=(--xla_gpu_enable_latency_hiding_scheduler=true
           --xla_gpu_all_reduce_combine_threshold_bytes=134217728
           --xla_gpu_all_gather_combine_threshold_bytes=134217728
           --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728)
XLA_FLAGS=${XLA_FLAGS:-${gpu_flags[*]}}
# jax preallocates 75% of GPU memory by default; the optimizer state of the L and XL models
# wants more of it.
XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
NCCL_DEBUG=${NCCL_DEBUG:-WARN}

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

# Prints the command (DRY_RUN=1) or runs it.
run() {
    if [[ $DRY_RUN == 1 ]]; then quote "$@"; else "$@"; fi
}

setenv() {
    export "$1=$2"
    if [[ $DRY_RUN == 1 ]]; then echo "export $(quote "$1=$2")"; fi
}

# The first host of a SLURM node list: what `scontrol show hostnames` prints first. Without
# scontrol (a dry run on a laptop), the rule jax itself uses: node[001-004,9],x -> node001.
first_host() {
    local hosts
    if [[ $DRY_RUN != 1 ]] && command -v scontrol >/dev/null; then
        hosts=$(scontrol show hostnames "$1")
        echo "${hosts%%$'\n'*}"
    elif [[ $1 =~ ^([^],[]+)(\[([^],-]+))? ]]; then
        echo "${BASH_REMATCH[1]}${BASH_REMATCH[3]}"
    else
        die "cannot read the node list '$1'."
    fi
}

[[ -n $JOB_ID && -n $NODELIST && -n $NUM_NODES ]] ||
    die "not inside a SLURM allocation; submit with 'sbatch launch/slurm_gpu.sh' (for DRY_RUN=1, set SLURM_JOB_ID, SLURM_JOB_NODELIST and SLURM_JOB_NUM_NODES)."
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE=$GPUS_PER_NODE must be a positive integer."
case $PROCESS_PER in
    gpu) tasks_per_node=$GPUS_PER_NODE ;;
    node) tasks_per_node=1 ;;
    *) die "PROCESS_PER=$PROCESS_PER must be 'gpu' or 'node'." ;;
esac
job_tasks_per_node=${SLURM_NTASKS_PER_NODE:-}
if [[ $job_tasks_per_node =~ ^[0-9]+$ ]] && ((job_tasks_per_node < tasks_per_node)); then
    die "PROCESS_PER=gpu needs $tasks_per_node tasks per node but the job has $job_tasks_per_node; submit with --ntasks-per-node=$tasks_per_node or set PROCESS_PER=node."
fi
if [[ -z $CPUS_PER_TASK && ${SLURM_CPUS_ON_NODE:-} =~ ^[0-9]+$ ]]; then
    # srun gives a task one CPU unless told otherwise; the data loader's threads want their share.
    CPUS_PER_TASK=$((SLURM_CPUS_ON_NODE / tasks_per_node))
fi
cd "$REPO_DIR" || die "REPO_DIR=$REPO_DIR does not exist."
[[ -f $CONFIG ]] || die "CONFIG=$CONFIG does not exist under REPO_DIR=$REPO_DIR; submit from the repository root or set REPO_DIR."
if [[ -n $VENV ]]; then
    # shellcheck disable=SC1091  # the user's environment, not part of this repository
    source "$VENV/bin/activate" || die "VENV=$VENV has no bin/activate."
fi

coordinator="$(first_host "$NODELIST"):$COORDINATOR_PORT"
num_processes=$((NUM_NODES * tasks_per_node))
echo "# switch-dit job $JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NUM_NODES node(s) x" \
     "$GPUS_PER_NODE GPU(s), $num_processes process(es), one per $PROCESS_PER, coordinator" \
     "$coordinator, workdir $WORKDIR"

run cd "$REPO_DIR"
# jax.distributed.initialize() (called by main under SLURM) takes the coordinator from here and
# the process count and ids from SLURM_NTASKS / SLURM_PROCID.
setenv JAX_COORDINATOR_ADDRESS "$coordinator"
if [[ $PROCESS_PER == node ]]; then
    # Under SLURM jax defaults to the single GPU SLURM_LOCALID; a per-node process wants all.
    setenv JAX_LOCAL_DEVICE_IDS "$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
fi
setenv XLA_FLAGS "$XLA_FLAGS"
setenv XLA_PYTHON_CLIENT_MEM_FRACTION "$XLA_PYTHON_CLIENT_MEM_FRACTION"
setenv NCCL_DEBUG "$NCCL_DEBUG"

# Fail in seconds, not after 64 processes time out: every node must read the config, see the
# workdir (all processes write checkpoints into that one directory) and import the package.
marker="$WORKDIR/.shared_check_$JOB_ID"
# shellcheck disable=SC2016  # expanded by the bash on each node, from its arguments
node_check='host=$(hostname)
cd "$1" && test -f "$2" || { echo "error: $host cannot read $2 in $1; REPO_DIR must be on storage every node mounts." >&2; exit 3; }
test -f "$3" || { echo "error: $host cannot see WORKDIR=$4; put it on storage every node mounts." >&2; exit 3; }
"$5" -c "import switch_dit_jax" || { echo "error: $host cannot import switch_dit_jax with $5; install it where every node finds it (VENV, PYTHON)." >&2; exit 4; }'
run mkdir -p "$WORKDIR"
run touch "$marker"
run srun --nodes="$NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c "$node_check" node_check "$REPO_DIR" "$CONFIG" "$marker" "$WORKDIR" "$PYTHON"
run rm -f "$marker"

train=(srun --nodes="$NUM_NODES" --ntasks-per-node="$tasks_per_node")
if [[ -n $CPUS_PER_TASK ]]; then train+=(--cpus-per-task="$CPUS_PER_TASK"); fi
train+=(--gpus-per-node="$GPUS_PER_NODE" --gpu-bind=none --kill-on-bad-exit=1 --label
        "$PYTHON" -m switch_dit_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
if [[ $DRY_RUN == 1 ]]; then
    run "${train[@]}"
    exit 0
fi

requeue=0
# shellcheck disable=SC2329  # invoked by the traps below
on_time_limit() {
    echo "# time limit near: the training processes save a checkpoint and stop; then requeue"
    requeue=1
    # Without --batch / --full, scancel signals the job steps (the training processes), not this
    # shell, and sends no SIGKILL after it.
    scancel --signal=TERM "$JOB_ID"
}
# shellcheck disable=SC2329
on_term() {
    echo "# SIGTERM (preempted or cancelled): the training processes are saving a checkpoint"
}
trap on_time_limit USR1
trap on_term TERM

"${train[@]}" &
srun_pid=$!
while :; do
    status=0
    wait "$srun_pid" || status=$?
    # A trapped signal ends `wait` early with 128+signal while srun runs on.
    if ((status > 128)) && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
    break
done

if ((requeue)); then
    if ((${SLURM_RESTART_COUNT:-0} < MAX_REQUEUES)); then
        echo "# requeueing job $JOB_ID; it resumes from $WORKDIR"
        scontrol requeue "$JOB_ID"
    else
        echo "# not requeueing: job $JOB_ID was requeued $MAX_REQUEUES times (MAX_REQUEUES)"
    fi
fi
exit "$status"
