"""Checkpointer (Orbax + grain) and PreemptionGuard, on CPU with 8 simulated devices."""
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import ckpt_crash_child as child
from switch_dit_jax.train.checkpoint import Checkpointer, ConfigMismatchError, config_fingerprint
from switch_dit_jax.train.preemption import PreemptionGuard
from switch_dit_jax.train.state import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
make_config, make_loader = child.make_config, child.make_loader


def make_state(seed: int = 0) -> TrainState:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {"dense": {"kernel": jax.random.normal(k1, (16, 8)), "bias": jnp.zeros((8,))},
              "embed": jax.random.normal(k2, (8, 4), jnp.bfloat16)}
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    # Move the moments off zero so that a restore that dropped them would be noticed.
    opt_state = jax.tree.map(lambda x: x + 0.5 if x.dtype != jnp.int32 else x + 7, opt_state)
    ema = jax.tree.map(lambda x: x * 0.9, params)
    model_state = {"thresholds": jax.random.uniform(k3, (4,))}
    return TrainState(step=jnp.asarray(seed, jnp.int32), params=params, opt_state=opt_state,
                      ema_params=ema, model_state=model_state, ema_model_state=model_state)


def assert_bitwise_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def batches(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def replicated():
    return NamedSharding(jax.make_mesh((8,), ("data",)), P())


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_is_bitwise_and_data_continues(tmp_path, async_save):
    state = make_state(3)
    it = iter(make_loader())
    batches(it, 3)
    with Checkpointer(str(tmp_path), make_config(), max_to_keep=2, async_save=async_save) as ck:
        assert ck.save(10, state, it)
        # Advancing the iterator while the async write is in flight must not change what is saved.
        expected = batches(it, 4)
    it2 = iter(make_loader())
    ck = Checkpointer(str(tmp_path), make_config(), max_to_keep=2)
    restored = ck.restore(jax.eval_shape(lambda: state), replicated(), it2)
    ck.close()
    assert isinstance(restored, TrainState)
    assert_bitwise_equal(restored, state)
    assert_same_batches(batches(it2, 4), expected)


def test_keeps_last_n_latest_step_and_older_restore(tmp_path):
    it = iter(make_loader())
    expected_after = {}
    ck = Checkpointer(str(tmp_path), make_config(), max_to_keep=2)
    assert ck.latest_step() is None
    for step in (1, 2, 3, 4):
        next(it)
        ck.save(step, make_state(step), it)
        expected_after[step] = batches(it, 2)
    ck.wait()
    assert ck.latest_step() == 4
    assert ck.all_steps() == [3, 4]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "4"]
    ck.close()

    ck = Checkpointer(str(tmp_path), make_config(), max_to_keep=2)
    assert ck.latest_step() == 4
    it3 = iter(make_loader())
    abstract = jax.eval_shape(lambda: make_state(0))
    assert_bitwise_equal(ck.restore(abstract, replicated(), it3, step=3), make_state(3))
    assert_same_batches(batches(it3, 2), expected_after[3])
    with pytest.raises(FileNotFoundError, match=r"step 1 .*complete ones are \[3, 4\]"):
        ck.restore(abstract, replicated(), None, step=1)
    ck.close()


def test_save_interval_force_and_existing_steps(tmp_path):
    cfg = make_config()
    cfg.train.checkpoint_every = 5
    cfg.train.num_steps = 12
    it = iter(make_loader())
    with Checkpointer(str(tmp_path), cfg, max_to_keep=5) as ck:
        assert not ck.save(3, make_state(3), it)
        assert ck.save(5, make_state(5), it)
        assert ck.save(7, make_state(7), it, force=True)  # e.g. on preemption
        assert not ck.save(7, make_state(7), it, force=True)  # already there: kept as is
        with pytest.raises(ValueError, match="later step 7"):
            ck.save(6, make_state(6), it, force=True)
        assert ck.save(12, make_state(12), it)  # the last step, train.num_steps
        ck.wait()
        assert ck.all_steps() == [5, 7, 12]


def test_restore_into_8_device_shardings(tmp_path):
    from switch_dit_jax import parallel
    cfg = make_config()
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    mesh = parallel.make_mesh(cfg.mesh)
    state = make_state(1)
    it = iter(make_loader())
    with Checkpointer(str(tmp_path), cfg, max_to_keep=1) as ck:
        ck.save(1, state, it)

    def spec(path, leaf):
        names = jax.tree_util.keystr(path)
        if leaf.ndim == 2 and "kernel" in names:
            return P("fsdp", None)
        if leaf.ndim == 2:
            return P(("data", "fsdp"), None)
        return P()
    shardings = jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec(p, x)), state)
    abstract = jax.eval_shape(lambda: state)
    with Checkpointer(str(tmp_path), cfg, max_to_keep=1) as ck:
        restored = ck.restore(abstract, shardings, iter(make_loader()))
    assert_bitwise_equal(restored, state)
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert leaf.sharding == sharding
    kernel = restored.params["dense"]["kernel"]
    assert len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (4, 8)


def test_fingerprint_fields():
    fp = config_fingerprint(make_config())
    for key in ("model.depth", "model.name", "diffusion.schedule", "data.name",
                "data.latent_scale", "train.global_batch_size", "train.b2",
                "train.grad_clip_norm>0"):
        assert key in fp
    for key in fp:
        assert not key.startswith(("mesh.", "sample.")), key
    for key in ("train.num_steps", "train.log_every", "train.checkpoint_every",
                "data.num_workers", "model.attention_impl", "train.remat_policy",
                "train.learning_rate"):
        assert key not in fp


def test_config_mismatch_is_one_clear_error_and_harmless_changes_pass(tmp_path):
    it = iter(make_loader())
    with Checkpointer(str(tmp_path), make_config(), max_to_keep=1) as ck:
        ck.save(1, make_state(1), it)
    abstract = jax.eval_shape(lambda: make_state(0))

    cfg = make_config()
    cfg.model.depth = 24
    cfg.train.grad_clip_norm = 1.0
    with Checkpointer(str(tmp_path), cfg, max_to_keep=1) as ck:
        with pytest.raises(ConfigMismatchError) as err:
            ck.restore(abstract, replicated(), iter(make_loader()))
    msg = str(err.value)
    assert "model.depth: checkpoint 12, config 24" in msg
    assert "train.grad_clip_norm>0: checkpoint false, config true" in msg
    assert "--workdir" in msg and "\n" not in msg

    cfg = make_config()
    cfg.train.num_steps = 7
    cfg.train.log_every = 3
    cfg.data.num_workers = 0
    cfg.sample.cfg_scale = 1.5
    cfg.model.attention_impl = "xla"
    cfg.train.remat_policy = "full"
    with Checkpointer(str(tmp_path), cfg, max_to_keep=1) as ck:
        assert_bitwise_equal(ck.restore(abstract, replicated(), iter(make_loader())), make_state(1))
        assert ck.saved_config()["config"]["train"]["num_steps"] == 400_000


def test_fields_newer_than_the_checkpoint_resume_at_their_defaults(tmp_path, monkeypatch):
    """A checkpoint written before model.ffn existed resumes when the config keeps the default."""
    from switch_dit_jax.train import checkpoint

    def older_fingerprint(config):
        return {k: v for k, v in config_fingerprint(config).items()
                if not k.startswith("model.ffn.")}
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "config_fingerprint", older_fingerprint)
        with Checkpointer(str(tmp_path), make_config(), max_to_keep=1) as ck:
            ck.save(1, make_state(1), iter(make_loader()))
    abstract = jax.eval_shape(lambda: make_state(0))
    with Checkpointer(str(tmp_path), make_config(), max_to_keep=1) as ck:
        assert "model.ffn.kind" not in ck.saved_config()["fingerprint"]
        assert_bitwise_equal(ck.restore(abstract, replicated(), iter(make_loader())), make_state(1))
    cfg = make_config()
    cfg.model.ffn.kind = "diffmoe"  # not what the older code trained
    with Checkpointer(str(tmp_path), cfg, max_to_keep=1) as ck:
        with pytest.raises(ConfigMismatchError, match='model.ffn.kind: checkpoint <absent>, '
                                                      'config "diffmoe"'):
            ck.restore(abstract, replicated(), None)


def test_user_errors_are_one_sentence(tmp_path):
    abstract = jax.eval_shape(lambda: make_state(0))
    with Checkpointer(str(tmp_path), make_config(), max_to_keep=1) as ck:
        with pytest.raises(FileNotFoundError, match="no complete checkpoint in .*--workdir"):
            ck.restore(abstract, replicated(), None)
        ck.save(1, make_state(1), iter(make_loader()))
        # A loader over a differently shuffled stream cannot take the saved position.
        source = child.grain.RangeDataSource(0, 100, 1)
        other = child.grain.DataLoader(
            data_source=source, operations=[child.grain.Batch(4)], worker_count=0,
            sampler=child.grain.IndexSampler(100, child.grain.NoSharding(), shuffle=True, seed=1))
        with pytest.raises(ValueError, match="data-iterator state at step 1") as err:
            ck.restore(abstract, replicated(), iter(other))
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(str(tmp_path), make_config(), max_to_keep=0)


def _run_children(tmp_path, modes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    procs = {m: subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "ckpt_crash_child.py"),
                                  str(tmp_path / m), m], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for m in modes}
    out = {}
    for m, p in procs.items():
        log, _ = p.communicate(timeout=120)
        out[m] = (p.returncode, log.decode(errors="replace")[-3000:])
    return out


def _restore_child_state(workdir, step):
    abstract = jax.eval_shape(lambda: child.make_state(0))
    it = iter(make_loader())
    with Checkpointer(str(workdir), make_config(), max_to_keep=3) as ck:
        assert ck.latest_step() == step
        mesh = jax.make_mesh((8,), ("data",))
        shardings = jax.tree.map(lambda x: NamedSharding(mesh, P("data") if x.ndim else P()), abstract)
        restored = ck.restore(abstract, shardings, it)
    assert_bitwise_equal(restored, child.make_state(step))
    ref = iter(make_loader())
    batches(ref, step)  # the child drew one batch before each save
    assert_same_batches(batches(it, 2), batches(ref, 2))


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path):
    out = _run_children(tmp_path, ["kill_in_commit", "exit_after_save", "no_close"])

    # Deterministic: the child SIGKILLs itself in the commit of step 2, after all of its bytes
    # are written, so step 2 exists only as an uncommitted temporary directory.
    rc, log = out["kill_in_commit"]
    assert rc == -signal.SIGKILL, log
    ckdir = tmp_path / "kill_in_commit" / "checkpoints"
    assert (ckdir / "1").is_dir() and not (ckdir / "2").exists()
    assert [p.name for p in ckdir.glob("2.orbax-checkpoint-tmp*")], sorted(os.listdir(ckdir))
    _restore_child_state(tmp_path / "kill_in_commit", 1)
    # Opening and restoring leave the leftover alone (it could be a live run's save in flight);
    # the resumed run's first save removes it.
    assert [p.name for p in ckdir.glob("2.orbax-checkpoint-tmp*")]
    with Checkpointer(str(tmp_path / "kill_in_commit"), make_config(), max_to_keep=3) as ck:
        ck.save(3, child.make_state(3), iter(make_loader()))
    assert sorted(os.listdir(ckdir)) == ["1", "3"]

    # Timing-dependent: the child exits as soon as the async save returns, normally mid-write.
    # Either step 2 never committed, or it committed completely and restores exactly.
    rc, log = out["exit_after_save"]
    assert rc == 1, log
    ckdir = tmp_path / "exit_after_save" / "checkpoints"
    latest = 2 if (ckdir / "2").exists() else 1
    _restore_child_state(tmp_path / "exit_after_save", latest)

    # A normal exit without close() still commits the pending async save. CPython 3.12.0 and
    # 3.12.1 refuse to start threads once the main module has ended (fixed in 3.12.2,
    # gh-113964), so Orbax cannot commit there; step 1 then stays the latest, intact checkpoint.
    rc, log = out["no_close"]
    assert rc == 0, log
    committed = ["1"] if sys.version_info[:3] in ((3, 12, 0), (3, 12, 1)) else ["1", "2"]
    assert sorted(p for p in os.listdir(tmp_path / "no_close" / "checkpoints")
                  if "tmp" not in p) == committed
    _restore_child_state(tmp_path / "no_close", int(committed[-1]))


def test_preemption_guard_sigterm_sets_flag_and_restores_handler():
    def previous(signum, frame):
        raise AssertionError("the guard's handler should be active")
    old = signal.signal(signal.SIGTERM, previous)
    try:
        with PreemptionGuard() as guard:
            assert not guard.should_stop(0)
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.received
            assert guard.should_stop(1)
            assert guard.should_stop(2)  # stays set
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_preemption_guard_multi_process_paths(monkeypatch):
    import switch_dit_jax.train.preemption as preemption
    mhu = preemption.multihost_utils
    before = signal.getsignal(signal.SIGTERM)

    # Without jax's preemption service: the local flags are OR-ed over processes, so a notice on
    # another process stops this one at the same step.
    others = {"flag": 0}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(mhu, "process_allgather",
                        lambda x: np.array([int(x), others["flag"]], np.int32))
    with PreemptionGuard() as guard:
        assert guard.mode == "allgather"
        assert not guard.should_stop(5)
        others["flag"] = 1
        assert guard.should_stop(6) and not guard.received
    assert signal.getsignal(signal.SIGTERM) is before

    # With it: no Python handler (it would displace JAX's C++ SIGTERM notifier) and the stop
    # step is JAX's sync point.
    monkeypatch.setattr(preemption, "_jax_preemption_service", lambda: True)
    monkeypatch.setattr(mhu, "reached_preemption_sync_point", lambda step: step == 9)
    with PreemptionGuard() as guard:
        assert guard.mode == "jax_sync"
        assert signal.getsignal(signal.SIGTERM) is before
        assert [guard.should_stop(s) for s in (7, 8, 9, 10)] == [False, False, True, True]


def test_read_only_checkpointer(tmp_path):
    with Checkpointer(str(tmp_path), make_config(), max_to_keep=2) as ck:
        ck.save(1, make_state(1), iter(make_loader()))
    with Checkpointer(str(tmp_path), make_config(), max_to_keep=2, read_only=True) as ck:
        assert ck.latest_step() == 1
        abstract = jax.eval_shape(lambda: make_state(0))
        assert_bitwise_equal(ck.restore(abstract, replicated(), None), make_state(1))
        with pytest.raises(ValueError, match="read-only"):
            ck.save(2, make_state(2), iter(make_loader()))


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
    """Users type --workdir=runs/x; Orbax itself only accepts absolute paths."""
    monkeypatch.chdir(tmp_path)
    config = make_config()
    state = make_state()
    it = iter(make_loader())
    with Checkpointer("runs/relative", config, max_to_keep=2, async_save=True) as ckpt:
        assert ckpt.save(3, state, it, force=True)
        ckpt.wait()
        assert ckpt.latest_step() == 3
    assert (tmp_path / "runs" / "relative" / "checkpoints" / "3").is_dir()


def test_a_nonfinite_state_is_never_saved(tmp_path):
    from switch_dit_jax.train.guard import NonFiniteStateError
    state = make_state(2)
    bad = state.replace(ema_params=jax.tree.map(lambda x: x.at[0].set(jnp.inf), state.ema_params))
    with Checkpointer(str(tmp_path), make_config(), max_to_keep=2) as ck:
        with pytest.raises(NonFiniteStateError, match="step 2: its ema_params hold NaN or inf"):
            ck.save(2, bad, iter(make_loader()), force=True)
        assert ck.all_steps() == []
        assert ck.save(2, state, iter(make_loader()), force=True)


def test_a_checkpoint_moved_aside_does_not_count_for_keep_n(tmp_path):
    """Step 4 is broken: the trainer restores 2, moves 4 to corrupt/, and keep-2 then keeps
    2 and the new 6 (a counted 4 would have rotated the last intact checkpoint out)."""
    abstract = jax.eval_shape(lambda: make_state(0))
    with Checkpointer(str(tmp_path), make_config(), max_to_keep=2) as ck:
        for step in (2, 4):
            ck.save(step, make_state(step), iter(make_loader()), force=True)
    manifest = tmp_path / "checkpoints" / "4" / "state" / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[:10])
    with Checkpointer(str(tmp_path), make_config(), max_to_keep=2) as ck:
        step, state = ck.restore_newest_intact(abstract, replicated(), move_corrupt=True)
        assert step == 2
        assert_bitwise_equal(state, make_state(2))
        ck.save(6, make_state(6), iter(make_loader()), force=True)
        ck.wait()
        assert ck.all_steps() == [2, 6]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "6", "corrupt"]
    assert os.listdir(tmp_path / "checkpoints" / "corrupt") == ["4"]
