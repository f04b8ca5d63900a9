#!/usr/bin/env bash
# N processes of switch_dit_jax.main on this machine, joined by jax.distributed over localhost
# and each owning its own CPU device(s): a multi-host run in miniature, for laptops and tests.
#
#   NUM_PROCESSES=2 launch/local_multiprocess.sh --config.train.num_steps=100
#
# Arguments are passed to every process after --config and --workdir. Each process logs to
# $LOG_DIR/process_<i>.log; process 0's log is also shown here. SIGINT / SIGTERM are passed on
# as SIGTERM, on which the program saves a checkpoint and exits. DRY_RUN=1 prints the commands.
set -euo pipefail

NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-1}
CONFIG=${CONFIG:-configs/quickstart.py}
WORKDIR=${WORKDIR:-runs/local_multiprocess}
LOG_DIR=${LOG_DIR:-$WORKDIR/logs}
PYTHON=${PYTHON:-python3}
PORT=${PORT:-}
DRY_RUN=${DRY_RUN:-0}
# Seconds the others get to exit by themselves after one process failed, before SIGKILL.
STOP_GRACE_S=${STOP_GRACE_S:-20}

die() { echo "error: $*" >&2; exit 2; }

[[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] ||
    die "NUM_PROCESSES=$NUM_PROCESSES must be a positive integer."
[[ $DEVICES_PER_PROCESS =~ ^[1-9][0-9]*$ ]] ||
    die "DEVICES_PER_PROCESS=$DEVICES_PER_PROCESS must be a positive integer."
[[ $STOP_GRACE_S =~ ^[0-9]+$ ]] || die "STOP_GRACE_S=$STOP_GRACE_S must be a number of seconds."
cd "$(dirname "$0")/.."  # relative CONFIG / WORKDIR paths are the repository's
[[ -f $CONFIG ]] || die "CONFIG=$CONFIG does not exist; pass a file under configs/."

if [[ -z $PORT ]]; then
    if [[ $DRY_RUN == 1 ]]; then
        PORT=12355  # a dry run must print the same commands every time
    else
        PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
    fi
fi

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

# The command of process $1, one word per array element.
process_command() {
    cmd=(env JAX_PLATFORMS=cpu
         "XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
         "$PYTHON" -m switch_dit_jax.main "--config=$CONFIG" "--workdir=$WORKDIR"
         "--coordinator_address=localhost:$PORT" "--num_processes=$NUM_PROCESSES"
         "--process_id=$1" "${@:2}")
}

if [[ $DRY_RUN == 1 ]]; then
    quote mkdir -p "$LOG_DIR"
    for ((i = 0; i < NUM_PROCESSES; i++)); do
        process_command "$i" "$@"
        echo "$(quote "${cmd[@]}") > $(quote "$LOG_DIR/process_$i.log") 2>&1 &"
    done
    exit 0
fi

mkdir -p "$LOG_DIR"
pids=()
forward_term() {
    echo "local_multiprocess.sh: passing SIGTERM on; the processes save a checkpoint and exit" >&2
    kill -TERM "${pids[@]}" 2>/dev/null || true
}
trap forward_term INT TERM

echo "starting $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU device(s), coordinator" \
     "localhost:$PORT, workdir $WORKDIR, logs $LOG_DIR/process_<i>.log"
for ((i = 0; i < NUM_PROCESSES; i++)); do
    process_command "$i" "$@"
    "${cmd[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
    pids+=($!)
done
# The program writes its log files itself (complete when it exits); tail only shows one.
tail -n +1 -f "$LOG_DIR/process_0.log" &
tail_pid=$!

# A process that dies leaves the others blocked in a collective; they notice the lost peer and
# exit within seconds (switch_dit_jax.train.peers, jax's heartbeat timeout). Tell them at once
# too, and SIGKILL any that is still there STOP_GRACE_S seconds later.
codes=()
first_failed=
failed_at=
killed=
while :; do
    running=0
    for i in "${!pids[@]}"; do
        [[ -n ${codes[$i]:-} ]] && continue
        if kill -0 "${pids[$i]}" 2>/dev/null; then
            running=$((running + 1))
            continue
        fi
        code=0
        wait "${pids[$i]}" || code=$?
        codes[i]=$code
        if ((code != 0)) && [[ -z $first_failed ]]; then
            first_failed=$i
            failed_at=$SECONDS
            kill -TERM "${pids[@]}" 2>/dev/null || true
        fi
    done
    ((running == 0)) && break
    if [[ -n $failed_at && -z $killed ]] && ((SECONDS - failed_at >= STOP_GRACE_S)); then
        echo "local_multiprocess.sh: $running process(es) still running ${STOP_GRACE_S}s after" \
             "process $first_failed failed; killing them" >&2
        kill -KILL "${pids[@]}" 2>/dev/null || true
        killed=1
    fi
    sleep 1 || true  # Ctrl-C kills the sleep too; the trap has passed SIGTERM on
done
kill "$tail_pid" 2>/dev/null || true
wait "$tail_pid" 2>/dev/null || true

if [[ -n $first_failed ]]; then
    echo "---- last lines of $LOG_DIR/process_$first_failed.log ----" >&2
    tail -n 20 "$LOG_DIR/process_$first_failed.log" >&2 || true
    # A process that aborts (XLA's fatal log, then Python's dump of every thread) names the
    # cause above its last 20 lines.
    fatal=$(grep -E -m 5 '^F[0-9]{4} |Fatal Python error|Terminating process' \
                "$LOG_DIR/process_$first_failed.log" || true)
    [[ -z $fatal ]] || printf -- '---- why it aborted ----\n%s\n' "$fatal" >&2
    echo "error: process $first_failed exited with status ${codes[$first_failed]}; all logs" \
         "are in $LOG_DIR." >&2
    exit 1
fi
echo "all $NUM_PROCESSES processes finished; logs in $LOG_DIR"
