"""Loss assembly and the pure train step: (state, batch, key) -> (state, metrics)."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from switch_dit_jax.diffusion.gaussian import GaussianDiffusion
from switch_dit_jax.train.state import TrainState, learning_rate_schedule


def make_diffusion(config, timestep_respacing: str = "") -> GaussianDiffusion:
    return GaussianDiffusion(schedule=config.diffusion.schedule,
                             num_timesteps=config.diffusion.num_timesteps,
                             learn_sigma=config.model.learn_sigma,
                             timestep_respacing=timestep_respacing)


def ema_update(ema, new, decay: float):
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, new)


def make_train_step(model: nn.Module, diffusion: GaussianDiffusion,
                    tx: optax.GradientTransformation, config) -> Callable:
    """The train step for `model` under `diffusion`; jit it with the state's shardings.

    All randomness of step s comes from fold_in(base_key, s), so a resumed run draws exactly
    what the uninterrupted one would have.
    """
    lr_fn = learning_rate_schedule(config.train)
    decay = float(config.train.ema_decay)

    def train_step(state: TrainState, batch: dict, base_key: jax.Array):
        key = jax.random.fold_in(base_key, state.step)
        k_t, k_noise, k_drop = jax.random.split(key, 3)
        x, y = batch["image"], batch["label"]
        t = jax.random.randint(k_t, (x.shape[0],), 0, diffusion.num_timesteps)
        noise = jax.random.normal(k_noise, x.shape, x.dtype)

        def loss_fn(params):
            def model_fn(x_t, t_model):
                return model.apply({"params": params, **state.model_state}, x_t, t_model, y,
                                   train=True, rngs={"dropout": k_drop})
            terms = diffusion.training_losses(model_fn, x, t, noise)
            return terms["loss"].mean(), {k: v.mean() for k, v in terms.items()}

        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            ema_params=ema_update(state.ema_params, params, decay),
            ema_model_state=ema_update(state.ema_model_state, state.model_state, decay))
        metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                       learning_rate=lr_fn(state.step))
        return new_state, jax.tree.map(lambda m: m.astype(jnp.float32), metrics)

    return train_step
