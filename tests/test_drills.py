"""Operator drills (issue 16): divergence, corrupt checkpoints, two trainers, a failed save,
metrics after a resume, SIGTERM in start-up and a dead peer, on tiny quickstart runs.

One tiny run is trained once per module and copied for every case that needs a checkpoint.
"""
import errno
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest

import test_train
from switch_dit_jax import parallel
from switch_dit_jax.data import pipeline
from switch_dit_jax.models import build_model
from switch_dit_jax.train import checkpoint as ckpt_lib
from switch_dit_jax.train import guard as guard_lib
from switch_dit_jax.train import loop
from switch_dit_jax.train import workdir_lock
from switch_dit_jax.train.checkpoint import Checkpointer
from switch_dit_jax.train.checkpoint_fallback import NoUsableCheckpointError
from switch_dit_jax.train.state import create_train_state, make_optimizer, state_shardings
from switch_dit_jax.train.step import make_diffusion, make_train_step

ROOT, QUICKSTART = test_train.ROOT, test_train.QUICKSTART
BASE = {"train.num_steps": 4, "train.checkpoint_every": 2}  # checkpoints 2 and 4


def config(**overrides):
    return test_train.tiny_config(**dict(BASE, **overrides))


def main_cmd(workdir, **overrides):
    return [sys.executable, "-m", "switch_dit_jax.main", f"--config={QUICKSTART}",
            f"--workdir={workdir}"] + test_train.cli_overrides(**dict(BASE, **overrides))


def child_env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", **extra)


def abstract_and_shardings(cfg):
    model = build_model(cfg.model)
    mesh = parallel.make_mesh(cfg.mesh)
    return state_shardings(model, make_optimizer(cfg.train), mesh)


def restore_step(workdir, step, cfg=None):
    cfg = cfg or config()
    abstract, shardings = abstract_and_shardings(cfg)
    with Checkpointer(workdir, cfg, max_to_keep=5, read_only=True) as ck:
        return jax.device_get(ck.restore(abstract, shardings, None, step=step))


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def steps_in(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run: checkpoints 2 and 4, metrics of steps 1-4."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    loop.train_and_evaluate(config(), workdir)
    assert steps_in(workdir) == [2, 4]
    return workdir


@pytest.fixture(scope="module")
def reference(trained):
    return {step: restore_step(trained, step) for step in (2, 4)}


def copy_run(trained, tmp_path, name="run"):
    workdir = str(tmp_path / name)
    shutil.copytree(trained, workdir)
    return workdir


# -- 1. divergence ------------------------------------------------------------------------------

def test_learning_rate_1e3_stops_with_one_sentence_and_saves_only_finite_states(tmp_path):
    workdir = str(tmp_path / "nan")
    out = subprocess.run(main_cmd(workdir, **{"train.learning_rate": 1e3, "train.num_steps": 40,
                                              "train.log_every": 10}),
                         cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: at step "), last
    assert "train.nonfinite='stop'" in last and "last finite checkpoint is step" in last
    steps = steps_in(workdir)
    assert steps and f"step {steps[-1]} in " in last
    cfg = config()
    for step in steps:  # everything that was written reads back finite
        restored = restore_step(workdir, step, cfg)
        assert guard_lib.nonfinite_parts(restored) == [], step


def test_skip_drops_a_nonfinite_update():
    cfg = test_train.tiny_config(**{"train.nonfinite": "skip", "train.warmup_steps": 0})
    model, tx = build_model(cfg.model), make_optimizer(cfg.train)
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    state = create_train_state(model, tx, jax.random.PRNGKey(0), mesh)
    step = jax.jit(make_train_step(model, make_diffusion(cfg), tx, cfg))
    bad = test_train.fixed_batch()
    bad["image"][3, 2, 2, 0] = np.nan
    before = jax.device_get(state)
    state, metrics = step(state, bad, jax.random.PRNGKey(1))
    after = jax.device_get(state)
    assert metrics[guard_lib.FINITE] == 0.0 and not np.isfinite(metrics["loss"])
    assert int(after.step) == int(before.step) + 1
    assert_same((after.params, after.opt_state, after.ema_params),
                (before.params, before.opt_state, before.ema_params))
    state, metrics = step(state, test_train.fixed_batch(), jax.random.PRNGKey(1))
    assert metrics[guard_lib.FINITE] == 1.0 and int(state.step) == 2
    assert guard_lib.nonfinite_parts(state) == []
    assert any(not np.array_equal(a, b) for a, b in  # a finite step is applied as usual
               zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before.params)))


# -- 2. corrupt checkpoints ---------------------------------------------------------------------

def _data_files(step_dir):
    """The state's OCDBT data files, the merged database's own (state/d) last: those are read
    for certain, while per-process files may be superseded by the merge."""
    per_process = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
    merged = glob.glob(os.path.join(step_dir, "state", "d", "*"))
    return sorted(per_process, key=os.path.getsize) + sorted(merged, key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _rewrite(workdir, cfg, transform):
    """Writes step 6 from step 4's state after `transform`, past the guard on purpose."""
    abstract, shardings = abstract_and_shardings(config())
    with Checkpointer(workdir, config(), max_to_keep=5) as ck:
        state = ck.restore(abstract, shardings, None, step=4)
    it = iter(pipeline.make_train_loader(cfg.data, cfg.train.global_batch_size, 0, 1))
    saved = ckpt_lib.guard.nonfinite_parts
    ckpt_lib.guard.nonfinite_parts = lambda s: []
    try:
        with Checkpointer(workdir, cfg, max_to_keep=5) as ck:
            assert ck.save(6, transform(state), it, force=True)
    finally:
        ckpt_lib.guard.nonfinite_parts = saved


def _nan_params(workdir):
    _rewrite(workdir, config(), lambda s: s.replace(
        params=jax.tree.map(lambda x: x * jnp.nan, s.params)))


def _other_config(workdir):
    _rewrite(workdir, config(**{"diffusion.schedule": "cosine"}), lambda s: s)


# (name, the newest checkpoint's corruption, the step restored, a fragment of the reason)
CORRUPTIONS = [
    ("truncated_data_file", lambda d, w: _truncate(_data_files(d)[-1]), 4, 2, "OUT_OF_RANGE"),
    ("deleted_data_file", lambda d, w: os.remove(_data_files(d)[-1]), 4, 2, "NOT_FOUND"),
    ("deleted_METADATA", lambda d, w: os.remove(os.path.join(d, "state", "_METADATA")), 4, 2,
     "state/_METADATA"),
    ("garbage_config_metadata", lambda d, w: open(os.path.join(d, "config", "metadata"), "w")
     .write("garbage{"), 4, 2, "config/metadata cannot be read"),
    ("empty_step_dir", lambda d, w: (shutil.rmtree(d), os.mkdir(d)), 4, 2, "empty"),
    ("missing_state_item", lambda d, w: shutil.rmtree(os.path.join(d, "state")), 4, 2,
     "state/ item"),
    ("missing_data_item", lambda d, w: shutil.rmtree(os.path.join(d, "data")), 4, 2,
     "data/ item"),
    ("truncated_manifest", lambda d, w: _truncate(os.path.join(d, "state", "manifest.ocdbt")),
     4, 2, "manifest.ocdbt"),
    ("garbage_METADATA", lambda d, w: open(os.path.join(d, "state", "_METADATA"), "w")
     .write("{not json"), 4, 2, "state does not read back"),
    ("nan_params", lambda d, w: _nan_params(w), 6, 4, "params hold NaN or inf"),
]


@pytest.mark.parametrize("name,corrupt,bad,good,reason", CORRUPTIONS,
                         ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_newest_checkpoint_falls_back(trained, reference, tmp_path, caplog, name,
                                              corrupt, bad, good, reason):
    workdir = copy_run(trained, tmp_path)
    ckdir = os.path.join(workdir, "checkpoints")
    corrupt(os.path.join(ckdir, "4"), workdir)
    caplog.set_level(logging.WARNING)

    # Readers (sampling, analysis) skip it and move nothing.
    _, _, state, _ = loop.restore_latest(config(), workdir)
    assert int(state.step) == good
    assert_same(jax.device_get(state), reference[good])
    assert os.path.isdir(os.path.join(ckdir, str(bad))) and not os.path.exists(
        os.path.join(ckdir, "corrupt"))
    lines = [r.getMessage() for r in caplog.records if "is unusable" in r.getMessage()]
    assert len(lines) == 1 and f"checkpoint step {bad} " in lines[0] and reason in lines[0], lines
    assert "skipping it" in lines[0] and "\n" not in lines[0]

    # The trainer moves it to checkpoints/corrupt/<step> and resumes from the intact one.
    caplog.clear()
    abstract, shardings = abstract_and_shardings(config())
    with Checkpointer(workdir, config(), max_to_keep=3) as ck:
        step, state = ck.restore_newest_intact(abstract, shardings, move_corrupt=True)
        assert step == good and ck.latest_step() == good
    assert_same(jax.device_get(state), reference[good])
    assert os.path.isdir(os.path.join(ckdir, "corrupt", str(bad)))
    assert not os.path.exists(os.path.join(ckdir, str(bad)))
    assert any(f"moved it to {ckdir}/corrupt/{bad}" in r.getMessage() for r in caplog.records)


def test_checkpoint_of_another_config_is_refused_not_skipped(trained, tmp_path):
    """Case 10: a readable checkpoint written with another config is the user's mix-up, not
    corruption: resuming an older step of the same workdir would hide it."""
    workdir = copy_run(trained, tmp_path)
    _other_config(workdir)
    with pytest.raises(ckpt_lib.ConfigMismatchError, match=r'diffusion\.schedule: checkpoint '
                                                             r'"cosine", config "linear"'):
        loop.restore_latest(config(), workdir)
    with pytest.raises(ckpt_lib.ConfigMismatchError, match="step 6"):
        loop.train_and_evaluate(config(**{"train.num_steps": 8}), workdir)
    assert steps_in(workdir) == [2, 4, 6]
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "corrupt"))


def test_training_resumes_past_a_corrupt_checkpoint_and_metrics_hold_each_step_once(
        trained, tmp_path, caplog):
    workdir = copy_run(trained, tmp_path)
    _truncate(_data_files(os.path.join(workdir, "checkpoints", "4"))[-1])
    caplog.set_level(logging.INFO)
    loop.train_and_evaluate(config(**{"train.num_steps": 6}), workdir)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "resumed from the checkpoint of step 2" in text
    assert "row(s) after step 2, which this run writes again" in text
    assert steps_in(workdir) == [2, 4, 6]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r["step"] for r in rows if "loss" in r]
    assert losses == [1, 2, 3, 4, 5, 6]  # exact resumes themselves: test_train


def test_every_checkpoint_broken_is_one_sentence(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    for step in (2, 4):
        os.remove(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA"))
    with pytest.raises(NoUsableCheckpointError) as err:
        loop.restore_latest(config(), workdir)
    assert "step 4: state/_METADATA" in str(err.value) and "step 2:" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(NoUsableCheckpointError, match="running again trains from "
                                                      "scratch"):
        loop.train_and_evaluate(config(), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "corrupt"))) == ["2", "4"]
    assert steps_in(workdir) == []  # so the next run starts from scratch


# -- 3. one writer per workdir ------------------------------------------------------------------

def _dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _write_lock(workdir, **holder):
    os.makedirs(workdir, exist_ok=True)
    info = dict(workdir_lock.holder_info(), **holder)
    if "pid" in holder:  # the start time that goes with that PID, as its holder would write
        info["pid_start_ticks"] = workdir_lock._process_start_ticks(holder["pid"])
    with open(os.path.join(workdir, workdir_lock.LOCK_NAME), "w") as f:
        json.dump(info, f)


def test_second_trainer_is_refused_and_sigterm_saves_and_releases(tmp_path):
    workdir = str(tmp_path / "shared")
    first = subprocess.Popen(main_cmd(workdir, **{"train.num_steps": 100000,
                                                  "train.checkpoint_every": 100000}),
                             cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        metrics = os.path.join(workdir, "metrics.jsonl")
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None:
            if os.path.exists(metrics) and len(open(metrics).readlines()) >= 2:
                break
            time.sleep(0.2)
        with pytest.raises(workdir_lock.WorkdirLockedError) as err:
            loop.train_and_evaluate(config(), workdir)
        message = str(err.value)
        assert f"PID {first.pid}" in message and socket.gethostname() in message
        assert "in use by another trainer" in message and "\n" not in message
        # Readers take no lock: they only find no checkpoint yet.
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            loop.restore_latest(config(), workdir)
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        out = first.communicate(timeout=120)[0]
    assert first.returncode == 0, out[-3000:]
    assert "SIGTERM: saved the checkpoint of step" in out
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))


def test_stale_lock_is_taken_over(trained, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING)
    workdir = copy_run(trained, tmp_path)
    _write_lock(workdir, pid=_dead_pid())  # this host, a PID that has exited
    loop.train_and_evaluate(config(), workdir)  # nothing to train, but it ran
    assert any("taking over the stale lock" in r.getMessage() and "no process" in r.getMessage()
               for r in caplog.records)
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))

    # A live holder of the same SLURM job: this run is its requeue.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        _write_lock(workdir, pid=sleeper.pid, slurm_job_id="4242")
        caplog.clear()
        loop.train_and_evaluate(config(), workdir)
        assert any("this SLURM job (4242)" in r.getMessage() for r in caplog.records)
        # ... but another job's live trainer is not.
        _write_lock(workdir, pid=sleeper.pid, slurm_job_id="7")
        with pytest.raises(workdir_lock.WorkdirLockedError, match="SLURM job 7"):
            loop.train_and_evaluate(config(), workdir)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_of_another_host_is_kept_and_a_takeover_stops_the_old_holder(tmp_path):
    _write_lock(str(tmp_path), host="elsewhere", pid=1)
    with pytest.raises(workdir_lock.WorkdirLockedError, match="host elsewhere, PID 1"):
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    os.remove(tmp_path / workdir_lock.LOCK_NAME)
    lock = workdir_lock.WorkdirLock(str(tmp_path))
    lock.acquire()
    workdir_lock.check_still_held(lock, 5)
    _write_lock(str(tmp_path), host="elsewhere", pid=1)  # e.g. a requeued copy took over
    with pytest.raises(workdir_lock.WorkdirLockedError, match="stops at step 5 without saving"):
        workdir_lock.check_still_held(lock, 5)
    lock.release()  # not ours any more: left in place
    assert os.path.exists(tmp_path / workdir_lock.LOCK_NAME)


# -- 6. operations ------------------------------------------------------------------------------

def test_failed_background_save_is_reported_at_once(tmp_path, monkeypatch):
    from orbax.checkpoint._src.checkpointers import async_checkpointer
    original = async_checkpointer._background_wait_for_commit_futures

    def disk_full_at_step_8(directory, *args, **kwargs):
        if os.path.basename(str(directory)).split(".")[0] == "8":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(directory, *args, **kwargs)
    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures",
                        disk_full_at_step_8)
    workdir = str(tmp_path / "full")
    with pytest.raises(ckpt_lib.CheckpointSaveError) as err:
        loop.train_and_evaluate(config(**{"train.num_steps": 40, "train.checkpoint_every": 4}),
                                workdir)
    message = str(err.value)
    assert "the background save of step 8" in message and "No space left" in message
    assert "the latest checkpoint is still step 4" in message and "\n" not in message
    logged = max(test_train.metrics_by_step(workdir))
    assert 8 <= logged < 12, logged  # reported before the next save was due
    assert steps_in(workdir) == [4]


def test_sigterm_during_startup_exits_cleanly_saving_nothing(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    proc = subprocess.Popen(main_cmd(workdir, **{"train.num_steps": 8}), cwd=ROOT,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    for line in proc.stdout:  # SIGTERM as soon as the trainer starts up
        seen.append(line)
        if "process 0/1" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert ("SIGTERM during start-up: exiting before training; nothing was saved (the latest "
            "checkpoint, step 4 in ") in out, out[-3000:]
    assert steps_in(workdir) == [2, 4]
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))


def test_sigterm_in_process_during_startup(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    original = loop.state_shardings

    def shardings_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)
    monkeypatch.setattr(loop, "state_shardings", shardings_then_sigterm)
    workdir = str(tmp_path / "early")
    loop.train_and_evaluate(config(), workdir)
    assert any("SIGTERM during start-up: exiting before training; nothing was saved (there is "
               "no checkpoint yet)." in r.getMessage() for r in caplog.records)
    assert steps_in(workdir) == []


@pytest.mark.parametrize("victim", [1, 0], ids=["kill_process_1", "kill_coordinator"])
def test_dead_peer_ends_the_survivor_within_15s_saving_nothing(tmp_path, victim):
    workdir = str(tmp_path / "pair")
    port = portpicker.pick_unused_port()
    env = child_env(XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen(main_cmd(workdir, **{"train.num_steps": 100000,
                                                   "train.checkpoint_every": 100000})
                              + [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                 f"--process_id={pid}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for pid in range(2)]
    try:
        metrics = os.path.join(workdir, "metrics.jsonl")
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
                break
            time.sleep(0.2)
        assert all(p.poll() is None for p in procs)
        procs[victim].kill()
        start = time.time()
        survivor = procs[1 - victim]
        out = survivor.communicate(timeout=60)[0]
        took = time.time() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert took <= 15, took
    assert survivor.returncode != 0
    assert steps_in(workdir) == []  # saved nothing
    if victim == 1:  # the coordinator survives: the error reaches Python, one sentence
        last = out.strip().splitlines()[-1]
        assert last.startswith("error: process 0 of 2 lost contact with another process"), last
        assert survivor.returncode == 1 and "saves nothing and exits now" in last
