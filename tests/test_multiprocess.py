"""2 processes on localhost (jax.distributed, gloo): training, checkpoints, agreement."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from switch_dit_jax import parallel
from switch_dit_jax.models import build_model
from switch_dit_jax.train.state import create_train_state, make_optimizer, state_shardings
from switch_dit_jax.train.step import make_diffusion, make_train_step

import test_train

HERE = os.path.dirname(os.path.abspath(__file__))


def child_env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=HERE + os.pathsep + test_train.ROOT)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"  # one device per process
    # main's 10 s heartbeat timeout is for a lost peer (the drills test it), not a loaded CI host.
    env["SWITCH_DIT_HEARTBEAT_TIMEOUT_S"] = "120"
    return env


def run_pair(args_of, timeout=400):
    procs = [subprocess.Popen(args_of(pid), cwd=test_train.ROOT, env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in range(2)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


@pytest.mark.parametrize("overrides", [
    {},
    # DiffMoE with its experts split over the two processes: one pool spans both hosts.
    dict(test_train.DIFFMOE, **{"mesh.data": 1, "mesh.expert": 2})])
def test_two_processes_agree_with_one(tmp_path, overrides):
    port = portpicker.pick_unused_port()
    out = str(tmp_path / "two.npz")
    run_pair(lambda pid: [sys.executable, os.path.join(HERE, "multiprocess_child.py"), str(port),
                          str(pid), str(tmp_path / "ckpt"), out, json.dumps(overrides)])

    config = test_train.tiny_config(**overrides)
    model = build_model(config.model)
    tx = make_optimizer(config.train)
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:2])
    _, shardings = state_shardings(model, tx, mesh)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), mesh)
    step_fn = jax.jit(make_train_step(model, make_diffusion(config), tx, config),
                      in_shardings=(shardings, parallel.batch_sharding(mesh),
                                    parallel.replicated(mesh)),
                      out_shardings=(shardings, parallel.replicated(mesh)))
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(3):
            state, metrics = step_fn(state, test_train.fixed_batch(), jax.random.PRNGKey(1))
            losses.append(float(metrics["loss"]))
    with np.load(out) as f:
        np.testing.assert_allclose(f["losses"], losses, rtol=1e-6)
        leaves = jax.tree.leaves(jax.device_get((state.params, state.model_state)))
        assert len(leaves) == len(f.files) - 1
        for i, leaf in enumerate(leaves):
            np.testing.assert_allclose(f[str(i)], leaf, rtol=1e-5, atol=1e-7)


def test_main_on_two_processes_saves_and_resumes(tmp_path):
    workdir = str(tmp_path / "run")

    def main_cmd(steps, port):
        return lambda pid: [sys.executable, "-m", "switch_dit_jax.main",
                            f"--config={test_train.QUICKSTART}", f"--workdir={workdir}",
                            f"--coordinator_address=localhost:{port}", "--num_processes=2",
                            f"--process_id={pid}"] + test_train.cli_overrides(
                                # Switch-DiT: every process must solve its prior loss's
                                # assignment alike inside the sharded step.
                                **{"train.num_steps": steps, "model.routing.kind": "switch"})

    run_pair(main_cmd(3, portpicker.pick_unused_port()))
    outs = run_pair(main_cmd(6, portpicker.pick_unused_port()))
    assert "resumed from the checkpoint of step 3" in outs[0]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    metrics = test_train.metrics_by_step(workdir)
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
    assert all(m["prior_loss"] > 0 for m in metrics.values())
