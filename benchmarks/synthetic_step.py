"""The sharded, jitted train step of a config on a fixed synthetic batch (for benchmarks)."""
from __future__ import annotations

import jax
import numpy as np

from switch_dit_jax import cpu_tuning, parallel
from switch_dit_jax.models import build_model
from switch_dit_jax.train.state import create_train_state, make_optimizer, state_shardings
from switch_dit_jax.train.step import make_diffusion, make_train_step


def synthetic_step(config):
    """(jitted step, initial state, batch, key, mesh, model); the step donates its state.

    Like `main`, it first tunes malloc and XLA:CPU's matmuls for a large CPU step
    (switch_dit_jax/cpu_tuning.py), which only takes effect in the first call of a process,
    before jax's backend starts."""
    cpu_tuning.for_config(config)
    mesh = parallel.make_mesh(config.mesh)
    model = build_model(config.model, remat_policy=config.train.remat_policy)
    tx = make_optimizer(config.train, config.loss)
    _, shardings = state_shardings(model, tx, mesh, config.loss)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), mesh, config.loss)
    b, s, c = config.train.global_batch_size, model.input_size, model.in_channels
    rng = np.random.default_rng(0)
    batch = jax.device_put({"image": rng.standard_normal((b, s, s, c), np.float32),
                            "label": rng.integers(0, model.num_classes, b).astype(np.int32)},
                           parallel.batch_sharding(mesh))
    step = jax.jit(make_train_step(model, make_diffusion(config), tx, config),
                   in_shardings=(shardings, parallel.batch_sharding(mesh),
                                 parallel.replicated(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
    return step, state, batch, jax.random.PRNGKey(1), mesh, model
