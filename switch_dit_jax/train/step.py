"""Loss assembly and the pure train step: (state, batch, key) -> (state, metrics).

L = mean_b(w(t_b)·mse_b + vb_b)  (or the ANT-UW form)  + λ_dp·L_dp + λ_lb·L_balance
    + λ_cp·L_capacity
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from switch_dit_jax.diffusion import weighting
from switch_dit_jax.diffusion.flow import RectifiedFlow
from switch_dit_jax.diffusion.gaussian import GaussianDiffusion
from switch_dit_jax.models import schedule, switch
from switch_dit_jax.train.guard import FINITE
from switch_dit_jax.train.metrics import BUCKET_COUNTS, BUCKET_SUMS
from switch_dit_jax.train.state import (UW_PARAMS, TrainState, learning_rate_schedule,
                                        model_params)


def make_diffusion(config, timestep_respacing: str = ""):
    """The training objective: GaussianDiffusion, or RectifiedFlow for objective='flow'."""
    if config.diffusion.objective == "flow":
        return RectifiedFlow()
    return GaussianDiffusion(schedule=config.diffusion.schedule,
                             num_timesteps=config.diffusion.num_timesteps,
                             learn_sigma=config.model.learn_sigma,
                             timestep_respacing=timestep_respacing)


def timestep_range(diffusion_config) -> tuple[int, int]:
    """[lo, hi) of the training timesteps: config.diffusion.t_range, (0, 0) meaning all T."""
    lo, hi = tuple(diffusion_config.get("t_range", (0, 0)))
    return (0, diffusion_config.num_timesteps) if (lo, hi) == (0, 0) else (lo, hi)


def ema_update(ema, new, decay: float):
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, new)


def routers_aux(aux: dict, depth: int, name: str) -> jax.Array | None:
    """Stack one sown routing output over the blocks: [N, ...] (None without routers)."""
    values = [aux.get(f"routers_{i}", {}).get(name) for i in range(depth)]
    if any(v is None for v in values):
        return None
    return jnp.stack([v[0] for v in values])


def routing_losses(model: nn.Module, aux: dict, t: jax.Array, key: jax.Array,
                   loss_config) -> dict[str, jax.Array]:
    """Switch-DiT's auxiliary losses and routing statistics from the sown aux collection."""
    out = {}
    r = model.routing or {}
    gates = routers_aux(aux, model.depth, "batch_gates")  # [N, B, M]
    if gates is None:
        return out
    usage = jnp.mean((gates > 0).astype(jnp.float32), axis=1)  # [N, M]
    for i in range(model.depth):
        for j in range(usage.shape[1]):
            out[f"routing/usage_block{i:02d}_expert{j}"] = usage[i, j]
    gate_probs = routers_aux(aux, model.depth, "gate_probs")  # [N, T, M]
    if gate_probs is not None and loss_config.prior_weight > 0:
        w_prior = switch.prior_activation_map(model.depth, r["num_experts"], r["top_k"],
                                              r["num_tasks"], r["alpha"])
        out["prior_loss"] = switch.diffusion_prior_loss(
            jnp.swapaxes(gate_probs, 0, 1), t, jnp.asarray(w_prior), r["top_k"], key)
    probs = routers_aux(aux, model.depth, "batch_probs")  # [N, B, M]
    if probs is not None and loss_config.load_balance_weight > 0:
        out["load_balance_loss"] = jnp.mean(jax.vmap(switch.load_balancing_loss)(probs, gates))
    return out


def mixture_losses(aux: dict, depth: int) -> dict[str, jax.Array]:
    """DiffMoE's capacity-predictor BCE (summed over MoE layers, official), TC-DiT's balance
    loss E·Σ_e P_e f_e (summed over MoE layers, official) and the training capacity C (Eq. 9)."""
    bce, balance, capacity = [], [], []
    for i in range(depth):
        sown = aux.get(f"blocks_{i}", {}).get("mlp", {})
        if "capacity_logits" in sown:
            logits, target = sown["capacity_logits"][0], sown["dispatch"][0]
            bce.append(optax.sigmoid_binary_cross_entropy(logits, target).mean())
        if "balance_probs" in sown:
            p, f = sown["balance_probs"][0], sown["balance_fraction"][0]
            balance.append(p.shape[0] * jnp.sum(p * f))
        if "capacity" in sown:
            capacity.append(sown["capacity"][0].mean())
    out = {}
    if bce:
        out["capacity_loss"] = jnp.sum(jnp.stack(bce))
    if balance:  # summed: the official AddAuxiliaryLoss adds each layer's term to the loss
        out["load_balance_loss"] = jnp.sum(jnp.stack(balance))
    if capacity:
        out["capacity"] = jnp.mean(jnp.stack(capacity))
    return out


def timestep_buckets(t: jax.Array, num_buckets: int, horizon: float) -> jax.Array:
    """Bucket k of K holds t in [k·T/K, (k+1)·T/K) (T = num_timesteps; 1 for flow times)."""
    if jnp.issubdtype(t.dtype, jnp.integer):
        return (t * num_buckets) // int(horizon)
    return jnp.clip(jnp.floor(t * (num_buckets / horizon)), 0, num_buckets - 1).astype(jnp.int32)


def split_micro_batches(a: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B/n, ...] with micro-batch i = samples i, i+n, i+2n, ...: strided, so a
    batch split over devices in contiguous blocks gives every device its share of every
    micro-batch (and ANT-UW's cluster-ordered layout stays cluster-ordered)."""
    return jnp.swapaxes(a.reshape((a.shape[0] // n, n) + a.shape[1:]), 0, 1)


def drop_conditions(key: jax.Array, y, null_y, prob: float):
    """Classifier-free guidance's condition dropout over a batch: each sample's condition
    becomes `null_y` with probability `prob`. `y` is a label array or a pytree of [B, ...]
    arrays (a text condition); `null_y` has y's structure without the batch dimension."""
    batch = jax.tree.leaves(y)[0].shape[0]
    drop = jax.random.uniform(key, (batch,)) < prob

    def pick(a, null):
        shape = (batch,) + (1,) * (a.ndim - 1)
        return jnp.where(drop.reshape(shape), jnp.asarray(null, a.dtype), a)

    return jax.tree.map(pick, y, null_y)


def batch_condition(batch: dict, model: nn.Module):
    """The model's `y` from a data batch: the labels, or the text tokens and their mask."""
    if getattr(model, "conditioning", "class") == "text":
        return {"text": batch["text"], "text_mask": batch["text_mask"]}
    return batch["label"]


def make_train_step(model: nn.Module, diffusion: GaussianDiffusion,
                    tx: optax.GradientTransformation, config,
                    null_condition=None) -> Callable:
    """The train step for `model` under `diffusion`; jit it with the state's shardings.

    A text model (conditioning="text") needs `null_condition`, the empty caption's
    {"text": [L, D], "text_mask": [L]} (data.captions.load_empty_caption): caption dropout
    replaces a sample's caption by it, as label dropout replaces a label by the null class.

    All randomness of step s comes from fold_in(base_key, s), so a resumed run draws exactly
    what the uninterrupted one would have. `metrics[FINITE]` is 1.0 when the loss and the
    gradient norm are finite; with train.nonfinite="skip" a step where it is 0.0 leaves params,
    optimizer state, model state and EMA unchanged (the step counter still advances).

    Gradient accumulation (train.grad_accum_steps = n > 1): timesteps, noise and label dropout
    are drawn for the whole batch, which is then split into n micro-batches run one after the
    other in a `lax.scan`; gradients and metrics are averaged over them, so a dense model takes
    the update of one big batch (to round-off). A model's own randomness (in-network dropout,
    noisy gating) is drawn per micro-batch. Mixtures see one micro-batch at a time: a DiffMoE
    pool is one micro-batch's tokens (per data-parallel group), its capacity-predictor BCE is
    taken against that pool's dispatch mask, and the thresholds take one EMA step per
    optimizer step from the mean over micro-batches of each pool's K-th predictor score (as
    over data-parallel groups). Batch-level losses that are not means over samples (the
    load-balancing losses) are averaged over micro-batches.
    """
    lr_fn = learning_rate_schedule(config.train)
    decay = float(config.train.ema_decay)
    loss_cfg = config.loss
    is_flow = isinstance(diffusion, RectifiedFlow)
    skip_nonfinite = config.train.get("nonfinite", "stop") == "skip"
    accum = int(config.train.get("grad_accum_steps", 1))
    num_buckets = int(config.train.get("loss_buckets", 0))
    horizon = 1.0 if is_flow else diffusion.num_timesteps
    # Label dropout is drawn here, per sample of the whole batch, rather than inside the model,
    # so that micro-batches drop exactly the labels one big batch would.
    if getattr(model, "conditioning", "class") == "text":
        drop_prob, null_y, net = float(model.caption_dropout_prob), null_condition, model
        if drop_prob > 0 and null_condition is None:
            raise ValueError("a text model with caption_dropout_prob > 0 needs the empty "
                             "caption: pass null_condition={'text', 'text_mask'}.")
    else:
        drop_prob = (float(getattr(model, "class_dropout_prob", 0.0))
                     if getattr(model, "num_classes", 1) > 1 else 0.0)
        null_y = getattr(model, "num_classes", 0)
        net = model.clone(class_dropout_prob=0.0) if drop_prob > 0 else model
    reads_step = schedule.needs_step(model)  # MaxRoaming masks, DiffMoE capacity_schedule

    def train_step(state: TrainState, batch: dict, base_key: jax.Array):
        key = jax.random.fold_in(base_key, state.step)
        k_t, k_noise, k_drop, k_model, k_prior = jax.random.split(key, 5)
        x, y = batch["image"], batch_condition(batch, model)
        if is_flow:
            t = diffusion.sample_t(k_t, x.shape[0])
        elif loss_cfg.weighting == "ant_uw":
            t = weighting.stratified_timesteps(k_t, x.shape[0], diffusion.num_timesteps,
                                               loss_cfg.uw_clusters)
        else:  # diffusion.t_range: a multi-experts member sees only its own interval
            t = jax.random.randint(k_t, (x.shape[0],), *timestep_range(config.diffusion))
        noise = jax.random.normal(k_noise, x.shape, x.dtype)
        w = 1.0 if is_flow else weighting.mse_weights(
            loss_cfg.weighting, diffusion.alphas_cumprod, t, min_snr_gamma=loss_cfg.min_snr_gamma,
            p2_gamma=loss_cfg.p2_gamma, p2_k=loss_cfg.p2_k)
        if drop_prob > 0:
            y = drop_conditions(k_drop, y, null_y, drop_prob)
        samples = {"x": x, "y": y, "t": t, "noise": noise,
                   "w": jnp.broadcast_to(jnp.asarray(w, jnp.float32), t.shape)}
        if num_buckets:
            samples["bucket"] = timestep_buckets(t, num_buckets, horizon)

        step_variables = (schedule.schedule_variables(model.depth, state.step) if reads_step
                          else {})

        def loss_fn(params, micro, k_model):
            k_dropout, k_gate = jax.random.split(k_model)
            sown, new_model_state = {}, {}

            def model_fn(x_t, t_model):
                out, mutated = net.apply(
                    {"params": model_params(params), **state.model_state, **step_variables},
                    x_t, t_model,
                    micro["y"], train=True, rngs={"dropout": k_dropout, "gating": k_gate},
                    mutable=["aux", *state.model_state])
                sown.update(mutated.pop("aux", {}))
                new_model_state.update(mutated)  # e.g. DiffMoE thresholds
                return out

            terms = diffusion.training_losses(model_fn, micro["x"], micro["t"], micro["noise"])
            per_sample = micro["w"] * terms["mse"] + terms["vb"]
            if UW_PARAMS in params:
                diffusion_loss = weighting.uncertainty_weighted_loss(
                    per_sample, params[UW_PARAMS]["log_var"])
            else:
                diffusion_loss = per_sample.mean()
            extra = {} if is_flow else routing_losses(
                model, sown, diffusion.model_timesteps(micro["t"]), k_prior, loss_cfg)
            extra.update(mixture_losses(sown, model.depth))
            loss = diffusion_loss
            if "prior_loss" in extra:
                loss = loss + loss_cfg.prior_weight * extra["prior_loss"]
            if "load_balance_loss" in extra:
                loss = loss + loss_cfg.load_balance_weight * extra["load_balance_loss"]
            if "capacity_loss" in extra:
                loss = loss + loss_cfg.capacity_weight * extra["capacity_loss"]
            metrics = {k: v.mean() for k, v in terms.items()}
            metrics.update(extra, loss=loss, diffusion_loss=diffusion_loss)
            sums = {}
            if num_buckets:  # the unweighted per-sample loss: comparable across weightings
                sums[BUCKET_SUMS] = jax.ops.segment_sum(terms["loss"], micro["bucket"],
                                                        num_buckets)
                sums[BUCKET_COUNTS] = jax.ops.segment_sum(
                    jnp.ones_like(terms["loss"]), micro["bucket"], num_buckets)
            return loss, (metrics, new_model_state, sums)

        grad_fn = jax.grad(loss_fn, has_aux=True)
        if accum == 1:
            grads, (metrics, model_state, sums) = grad_fn(state.params, samples, k_model)
        else:
            micro = jax.tree.map(lambda a: split_micro_batches(a, accum), samples)

            def accumulate(total, inputs):
                index, batch_i = inputs
                out = grad_fn(state.params, batch_i, jax.random.fold_in(k_model, index))
                return jax.tree.map(jnp.add, total, out), None

            first = jax.tree.map(lambda a: a[0], micro)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(grad_fn, state.params, first, k_model))
            total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), micro))
            # Means over micro-batches; the bucket sums and counts stay sums.
            (grads, (metrics, model_state, _)), sums = (
                jax.tree.map(lambda a: a / accum, total), total[1][2])
        model_state = {**state.model_state, **model_state}
        grad_norm = optax.tree.norm(grads)
        # Computed here, on the device, so that the loop learns of a divergence from the
        # metrics it fetches anyway instead of syncing on every step.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        def updated(state):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return state.replace(
                step=state.step + 1, params=params, opt_state=opt_state,
                model_state=model_state, ema_params=ema_update(state.ema_params, params, decay),
                ema_model_state=ema_update(state.ema_model_state, model_state, decay))

        if skip_nonfinite:
            # Drop the whole update; only the step counter moves on. A conditional rather than
            # a select over the state: selecting between the new and the donated old state
            # makes XLA copy all of it (DiT-S/2 on the CPU: +77 ms a step).
            new_state = jax.lax.cond(finite, updated, lambda s: s.replace(step=s.step + 1),
                                     state)
        else:
            new_state = updated(state)
        params = new_state.params
        # constant_schedule returns a Python float: make every metric an array.
        metrics = dict(metrics, **sums, grad_norm=grad_norm,
                       learning_rate=jnp.asarray(lr_fn(state.step), jnp.float32))
        metrics[FINITE] = finite
        if UW_PARAMS in params:
            for k in range(loss_cfg.uw_clusters):
                metrics[f"ant_uw/log_var{k}"] = params[UW_PARAMS]["log_var"][k]
        return new_state, jax.tree.map(lambda m: m.astype(jnp.float32), metrics)

    return train_step
