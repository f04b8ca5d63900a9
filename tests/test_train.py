"""Training system: sharded step equivalence, exact resume, SIGTERM, main end to end, configs."""
import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from switch_dit_jax import parallel
from switch_dit_jax.config_base import load_config
from switch_dit_jax.models import DiT, build_model
from switch_dit_jax.train import loop
from switch_dit_jax.train.checkpoint import Checkpointer
from switch_dit_jax.train.state import create_train_state, make_optimizer, state_shardings
from switch_dit_jax.train.step import make_diffusion, make_train_step
from switch_dit_jax.validation import ConfigError, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
TINY = {"model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2, "model.patch_size": 4,
        "train.global_batch_size": 16, "train.num_steps": 6, "train.log_every": 1,
        "train.checkpoint_every": 3, "train.sample_every": 0, "train.warmup_steps": 2,
        "sample.num_samples": 8, "sample.batch_size": 8, "sample.num_steps": 4}


def tiny_config(**overrides):
    return load_config(QUICKSTART, dict(TINY, **overrides))


def cli_overrides(**overrides):
    return [f"--config.{k}={v}" for k, v in dict(TINY, **overrides).items()]


def fixed_batch():
    rng = np.random.default_rng(0)
    return {"image": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
            "label": (np.arange(16) % 10).astype(np.int32)}


def restore_final(workdir, config):
    model = build_model(config.model)
    mesh = parallel.make_mesh(config.mesh)
    abstract, shardings = state_shardings(model, make_optimizer(config.train), mesh)
    with Checkpointer(workdir, config, max_to_keep=5, async_save=False) as ckpt:
        return jax.device_get(ckpt.restore(abstract, shardings, None))


def metrics_by_step(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r for r in rows if "loss" in r}


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def train_seeing_dit_calls(config, steps, see):
    """`steps` train steps of `config` on `fixed_batch()` on one device, calling `see(dit, x, t)`
    in every DiT forward pass; returns (model, final state, the host values `see` returned, one
    per call in order)."""
    model = build_model(config.model)
    tx = make_optimizer(config.train)
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    state = create_train_state(model, tx, jax.random.PRNGKey(0), mesh)
    seen = []

    def intercept(next_fn, args, kwargs, context):
        if isinstance(context.module, DiT) and context.method_name == "__call__":
            jax.debug.callback(lambda v: seen.append(jax.tree.map(np.asarray, v)),
                               see(context.module, *args[:2]))
        return next_fn(*args, **kwargs)

    step = jax.jit(make_train_step(model, make_diffusion(config), tx, config))
    with nn.intercept_methods(intercept):
        for i in range(steps):
            state, _ = step(state, fixed_batch(), jax.random.PRNGKey(i))
    return model, state, seen


ONE_DEVICE, DATA_BY_FSDP = dict(data=1, fsdp=1, expert=1), dict(data=2, fsdp=4, expert=1)


def steps_on_1_and_8_devices(model, tx, step_fn, batch, steps, mesh_sizes=DATA_BY_FSDP, *,
                             loss_config=None, check_state=None,
                             keep=lambda state, metrics: (state.params, metrics)):
    """`steps` jitted train steps from the same initial state on one device and on all 8 (the
    simulated CPU devices of conftest.py) split as `mesh_sizes`, state and batch sharded as in
    training; returns both runs' host copies of `keep(state, metrics)`. `check_state(state,
    sizes)` sees each run's fresh state (e.g. to check that a kernel really is split)."""
    results = []
    for sizes, devices in ((ONE_DEVICE, jax.devices()[:1]), (mesh_sizes, jax.devices())):
        mesh = parallel.make_mesh(sizes, devices)
        _, shardings = state_shardings(model, tx, mesh, loss_config)
        state = create_train_state(model, tx, jax.random.PRNGKey(0), mesh, loss_config)
        if check_state is not None:
            check_state(state, sizes)
        fn = jax.jit(step_fn, in_shardings=(shardings, parallel.batch_sharding(mesh),
                                            parallel.replicated(mesh)),
                     out_shardings=(shardings, parallel.replicated(mesh)))
        with jax.set_mesh(mesh):
            for _ in range(steps):
                state, metrics = fn(state, batch, jax.random.PRNGKey(1))
        results.append(jax.device_get(keep(state, metrics)))
    return results


DIFFMOE = {"model.depth": 2, "model.ffn.kind": "diffmoe", "model.ffn.num_experts": 8}


@pytest.mark.parametrize("mesh_sizes,overrides", [
    (dict(data=8, fsdp=1, expert=1), {}), (dict(data=1, fsdp=8, expert=1), {}),
    (dict(data=2, fsdp=4, expert=1), {}),
    # Experts on all 8 devices: the whole batch is one DiffMoE pool, as on one device.
    (dict(data=1, fsdp=1, expert=8), DIFFMOE)])
def test_step_on_8_devices_matches_1_device(mesh_sizes, overrides):
    config = tiny_config(**overrides)
    model = build_model(config.model)
    tx = make_optimizer(config.train)
    step_fn = make_train_step(model, make_diffusion(config), tx, config)
    split = []

    def check_state(state, sizes):
        if sizes["fsdp"] > 1:  # parameters really are split over the fsdp axis
            kernel = state.params["blocks_0"]["mlp"]["fc1"]["kernel"]
            assert kernel.sharding.shard_shape(kernel.shape) == (32 // sizes["fsdp"], 128)
        if sizes["expert"] > 1:  # and experts over the expert axis
            kernel = state.params["blocks_1"]["mlp"]["experts"]["fc1_kernel"]
            assert kernel.sharding.shard_shape(kernel.shape)[0] == 8 // sizes["expert"]
        split.append(sizes)

    results = steps_on_1_and_8_devices(
        model, tx, step_fn, fixed_batch(), 3, mesh_sizes, check_state=check_state,
        keep=lambda s, m: (s.params, s.ema_params, s.model_state, s.ema_model_state, m))
    assert split == [ONE_DEVICE, mesh_sizes]
    # Same math, different reduction order across devices: float32 round-off only.
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_step_without_warmup_reports_the_constant_learning_rate():
    """The paper configs have no warm-up: optax's constant schedule returns a Python float."""
    config = tiny_config(**{"train.warmup_steps": 0, "train.learning_rate": 3e-4})
    model = build_model(config.model)
    tx = make_optimizer(config.train)
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    state = create_train_state(model, tx, jax.random.PRNGKey(0), mesh)
    step = jax.jit(make_train_step(model, make_diffusion(config), tx, config))
    state, metrics = step(state, fixed_batch(), jax.random.PRNGKey(1))
    assert float(metrics["learning_rate"]) == pytest.approx(3e-4)
    assert int(state.step) == 1


def test_exact_resume_after_restart(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    loop.train_and_evaluate(tiny_config(), straight)
    loop.train_and_evaluate(tiny_config(**{"train.num_steps": 3}), resumed)
    loop.train_and_evaluate(tiny_config(), resumed)  # a new run: restores step 3, trains 4..6
    config = tiny_config()
    assert_trees_equal(restore_final(straight, config), restore_final(resumed, config))
    a, b = metrics_by_step(straight), metrics_by_step(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(a[s] == b[s] for s in a)  # losses of every step, data order included


def test_sigterm_saves_and_the_resumed_run_matches(tmp_path):
    """main is stopped by SIGTERM at a step it chooses; the resumed run equals a straight one."""
    workdir = str(tmp_path / "preempted")
    cmd = [sys.executable, "-m", "switch_dit_jax.main", f"--config={QUICKSTART}",
           f"--workdir={workdir}"] + cli_overrides(**{"train.num_steps": 100000,
                                                      "train.checkpoint_every": 100000})
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics_file = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics_file) and len(open(metrics_file).readlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM" in out
    config = tiny_config()
    with Checkpointer(workdir, config, max_to_keep=5, async_save=False) as ckpt:
        stopped_at = ckpt.latest_step()
    assert stopped_at is not None and stopped_at >= 3

    total = stopped_at + 2
    loop.train_and_evaluate(tiny_config(**{"train.num_steps": total}), workdir)
    straight = str(tmp_path / "straight")
    loop.train_and_evaluate(tiny_config(**{"train.num_steps": total}), straight)
    assert_trees_equal(restore_final(straight, config), restore_final(workdir, config))
    a, b = metrics_by_step(straight), metrics_by_step(workdir)
    assert all(a[s] == b[s] for s in range(1, total + 1))


def test_main_end_to_end_writes_checkpoint_metrics_samples(tmp_path):
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "switch_dit_jax.main", f"--config={QUICKSTART}",
           f"--workdir={workdir}"] + cli_overrides(**{"train.sample_every": 3,
                                                      "eval.eval_every": 6,
                                                      "eval.num_samples": 16,
                                                      "train.profile_steps": "2-3"})
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # The profiler trace of steps 2-3 and the persistent compilation cache (on by default).
    traces = [f for _, _, fs in os.walk(os.path.join(workdir, "profile")) for f in fs]
    assert any(f.endswith(".xplane.pb") for f in traces), traces
    assert "profile of steps 2-3 written" in out.stderr
    assert os.listdir(os.path.join(workdir, "compilation_cache"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    assert sorted(metrics_by_step(workdir)) == [1, 2, 3, 4, 5, 6]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/digits_fd" in r]  # the in-training evaluation
    assert [r["step"] for r in evals] == [6]
    assert 0 <= evals[0]["eval/digits_classifier_accuracy"] <= 1 and evals[0]["eval/digits_fd"] > 0
    samples = sorted(os.listdir(os.path.join(workdir, "samples")))
    assert samples == ["samples_00000003.npz", "samples_00000003.png",
                       "samples_00000006.npz", "samples_00000006.png"]
    with np.load(os.path.join(workdir, "samples", "samples_00000006.npz")) as f:
        assert f["arr_0"].shape == (8, 8, 8, 1) and f["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(f["arr_1"], np.arange(8) % 10)

    # --mode=sample with other labels and a CFG scale, then --mode=eval on those samples.
    config = tiny_config(**{"sample.labels": "3,4", "sample.cfg_scale": 3.0})
    paths = loop.sample_from_workdir(config, workdir)
    with np.load(paths["npz"]) as f:
        np.testing.assert_array_equal(f["arr_1"], [3, 4, 3, 4, 3, 4, 3, 4])
    result = loop.evaluate_workdir(config, workdir)
    assert 0.0 <= result["digits_classifier_accuracy"] <= 1.0 and result["digits_fd"] > 0
    assert os.path.exists(paths["npz"][:-4] + "_eval.json")


@pytest.mark.parametrize("overrides,field", [
    ({"model.patch_size": 3}, "model.patch_size"),
    ({"train.global_batch_size": 12}, "global_batch_size"),
    ({"model.name": "DiT-Q/2"}, "model.name"),
    ({"train.num_steps": -5}, "train.num_steps"),
    ({"train.learning_rate": 0.0}, "train.learning_rate"),
    ({"mesh.fsdp": 3}, "config.mesh"),
    ({"model.ffn.kind": "diffmoe", "model.ffn.num_experts": 6, "mesh.expert": 4,
      "mesh.data": 2}, "mesh.expert=4 does not divide model.ffn.num_experts=6"),
    ({"data.name": "cifar"}, "data.name"),
    ({"sample.sampler": "euler"}, "sample.sampler"),
    ({"sample.labels": "3,12"}, "sample.labels"),
    ({"model.input_size": 16, "model.patch_size": 4}, "model.input_size"),
    ({"diffusion.schedule": "sqrt"}, "diffusion.schedule"),
])
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(tiny_config(**overrides), num_devices=8)


def test_bad_config_on_the_command_line_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "switch_dit_jax.main", f"--config={QUICKSTART}",
           f"--workdir={tmp_path}", "--config.train.num_steps=-1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: config.train.num_steps=-1 must be an integer >= 0.")
