"""TrainState and its sharded creation from logical axis names."""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from switch_dit_jax import parallel
from switch_dit_jax.models import example_condition


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    ema_params: Any
    model_state: Any         # non-gradient collections (e.g. DiffMoE thresholds), may be {}
    ema_model_state: Any     # their EMA, used with ema_params for sampling


def learning_rate_schedule(train_config) -> optax.Schedule:
    lr, warmup = train_config.learning_rate, train_config.warmup_steps
    if warmup > 0:
        return optax.linear_schedule(0.0, lr, warmup)  # stays at lr after warm-up
    return optax.constant_schedule(lr)


# Top-level parameter entry of the ANT-UW log-variances (not part of the model).
UW_PARAMS = "ant_uw"


def make_optimizer(train_config, loss_config=None) -> optax.GradientTransformation:
    """AdamW (DiT: lr 1e-4, wd 0, betas 0.9/0.999) with optional global-norm clipping; with
    ANT-UW, its log-variances get their own Adam (lr loss.uw_learning_rate, no decay)."""
    adamw = optax.adamw(learning_rate_schedule(train_config), b1=train_config.b1,
                        b2=train_config.b2, eps=train_config.eps,
                        weight_decay=train_config.weight_decay)
    if train_config.grad_clip_norm > 0:
        adamw = optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), adamw)
    if not uses_uncertainty_weighting(loss_config):
        return adamw
    labels = lambda params: {k: "uw" if k == UW_PARAMS else "model" for k in params}  # noqa
    return optax.multi_transform({"model": adamw,
                                  "uw": optax.adam(loss_config.uw_learning_rate)}, labels)


def uses_uncertainty_weighting(loss_config) -> bool:
    return loss_config is not None and loss_config.get("weighting") == "ant_uw"


def model_params(params) -> dict:
    """The model's parameters without the loss-weighting entries."""
    return {k: v for k, v in params.items() if k != UW_PARAMS}


def _boxed_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                 loss_config=None) -> TrainState:
    """The initial state with parameters still boxed by their logical axis names."""
    s, c = model.input_size, model.in_channels
    variables = model.init(key, jnp.zeros((1, s, s, c)), jnp.zeros((1,)),
                           example_condition(model))
    variables = dict(variables)
    variables.pop("aux", None)  # per-step routing outputs, not state
    params = dict(variables.pop("params"))
    if uses_uncertainty_weighting(loss_config):
        params[UW_PARAMS] = {"log_var": nn.LogicallyPartitioned(
            jnp.zeros((loss_config.uw_clusters,)), (None,))}
    model_state = dict(variables)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params, model_state=model_state, ema_model_state=model_state)


def state_shardings(model: nn.Module, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, loss_config=None):
    """(abstract unboxed TrainState, its NamedShardings) without allocating anything."""
    boxed = jax.eval_shape(lambda k: _boxed_state(model, tx, k, loss_config),
                           jax.random.PRNGKey(0))
    return nn.unbox(boxed), parallel.logical_shardings(boxed, mesh)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       mesh: jax.sharding.Mesh, loss_config=None) -> TrainState:
    """Initialise the state directly into its shardings (no full copy on one device)."""
    _, shardings = state_shardings(model, tx, mesh, loss_config)
    init = jax.jit(lambda k: nn.unbox(_boxed_state(model, tx, k, loss_config)),
                   out_shardings=shardings)
    return init(key)


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
