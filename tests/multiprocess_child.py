"""One process of a 2-process jax.distributed run on localhost (gloo), for test_multiprocess.

usage: multiprocess_child.py PORT PROCESS_ID WORKDIR OUT.npz [CONFIG_OVERRIDES_JSON]
Trains 3 steps on a fixed global batch (each process feeds its half), saves and restores a
checkpoint, and (process 0) writes the params, model state and losses to OUT.npz.
"""
import json
import sys

import jax

port, pid, workdir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
overrides = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=pid)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import test_train  # noqa: E402
from switch_dit_jax import parallel  # noqa: E402
from switch_dit_jax.data import pipeline  # noqa: E402
from switch_dit_jax.models import build_model  # noqa: E402
from switch_dit_jax.train.checkpoint import Checkpointer  # noqa: E402
from switch_dit_jax.train.state import (create_train_state, make_optimizer,  # noqa: E402
                                        state_shardings)
from switch_dit_jax.train.step import make_diffusion, make_train_step  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 2
config = test_train.tiny_config(**overrides)
model = build_model(config.model)
tx = make_optimizer(config.train)
mesh = parallel.make_mesh(config.mesh)
abstract, shardings = state_shardings(model, tx, mesh)
state = create_train_state(model, tx, jax.random.PRNGKey(0), mesh)
step_fn = jax.jit(make_train_step(model, make_diffusion(config), tx, config),
                  in_shardings=(shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
                  out_shardings=(shardings, parallel.replicated(mesh)))
batch = test_train.fixed_batch()
local = {k: v[pid * 8:(pid + 1) * 8] for k, v in batch.items()}
losses = []
with jax.set_mesh(mesh):
    for _ in range(3):
        state, metrics = step_fn(state, pipeline.global_batch(local, parallel.batch_sharding(mesh)),
                                 jax.random.PRNGKey(1))
        losses.append(float(metrics["loss"]))

loader = pipeline.make_train_loader(config.data, 16, pid, 2)
it = iter(loader)
next(it)
with Checkpointer(workdir, config, max_to_keep=2) as ckpt:
    assert ckpt.save(3, state, it, force=True)
    ckpt.wait()
    it2 = iter(pipeline.make_train_loader(config.data, 16, pid, 2))
    restored = ckpt.restore(abstract, shardings, it2)
np.testing.assert_array_equal(next(it)["image"], next(it2)["image"])
params = multihost_utils.process_allgather((state.params, state.model_state), tiled=True)
same = multihost_utils.process_allgather((restored.params, restored.model_state), tiled=True)
for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same)):
    np.testing.assert_array_equal(a, b)
if pid == 0:
    leaves = {str(i): np.asarray(v) for i, v in enumerate(jax.tree.leaves(params))}
    np.savez(out, losses=np.asarray(losses), **leaves)
print(f"process {pid}: ok", flush=True)
