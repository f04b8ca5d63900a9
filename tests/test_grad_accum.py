"""Gradient accumulation (train.grad_accum_steps) and per-timestep-bucket losses."""
import jax
import numpy as np
import pytest

from switch_dit_jax import parallel
from switch_dit_jax.models import build_model
from switch_dit_jax.train import metrics as metrics_lib
from switch_dit_jax.train.state import create_train_state, make_optimizer
from switch_dit_jax.train.step import make_diffusion, make_train_step, timestep_buckets
import test_train


def initial_state(config):
    model = build_model(config.model)
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    return create_train_state(model, make_optimizer(config.train, config.loss),
                              jax.random.PRNGKey(0), mesh, config.loss)


def run_steps(config, state, steps=2):
    """(params, model_state, metrics of the last step) after `steps` steps from `state`."""
    model = build_model(config.model)
    tx = make_optimizer(config.train, config.loss)
    step = jax.jit(make_train_step(model, make_diffusion(config), tx, config))
    for _ in range(steps):
        state, metrics = step(state, test_train.fixed_batch(), jax.random.PRNGKey(1))
    return jax.device_get((state.params, state.model_state, metrics))


@pytest.mark.parametrize("overrides", [
    # A class-conditional DiT (label dropout 0.1, drawn for the whole batch) with DTR's fixed
    # masks and per-sample Min-SNR weights: everything of the dense DiT step, and DTR.
    {"model.routing.kind": "dtr", "loss.weighting": "min_snr"},
    # Switch-DiT: + the diffusion prior loss, and ANT-UW (16 / 4 clusters / 4 micro-batches).
    {"model.routing.kind": "switch", "loss.weighting": "ant_uw", "loss.uw_clusters": 4,
     "diffusion.num_timesteps": 100, "model.routing.num_tasks": 100},
], ids=["dit_dtr", "switch"])
def test_four_micro_batches_give_the_update_of_one_batch(overrides):
    state = initial_state(test_train.tiny_config(**overrides))
    one = run_steps(test_train.tiny_config(**overrides), state)
    four = run_steps(test_train.tiny_config(**overrides, **{"train.grad_accum_steps": 4}), state)
    assert one[2]["loss"] > 0 and "loss/t_bucket_0" not in one[2]  # sums, not yet the means
    # A mean over 16 samples taken as the mean of 4 means of 4: float32 round-off only. Adam's
    # first steps move each parameter by about ±lr, so round-off in a gradient shows up in the
    # parameters only where that gradient is ~eps.
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_a_diffmoe_pool_is_one_micro_batch_and_thresholds_take_one_ema_step():
    moe = {"model.ffn.kind": "diffmoe", "model.ffn.first": 0, "model.ffn.num_experts": 8,
           "model.ffn.capacity": 0.9}  # one block, a DiffMoE layer
    # 16 images x 4 tokens: one pool of the whole batch would give K = int(0.9 * 64 / 8) = 7
    # tokens per expert, C = 7 * 8 / 64 = 0.875; with 4 micro-batches a pool holds 16 tokens:
    # K = int(0.9 * 16 / 8) = 1, C = 1 * 8 / 16.
    state = initial_state(test_train.tiny_config(**moe))
    states = {}
    for decay in (0.0, 0.5):
        cfg = test_train.tiny_config(**moe, **{"train.grad_accum_steps": 4,
                                               "model.ffn.threshold_decay": decay})
        _, states[decay], metrics = run_steps(cfg, state, steps=1)
        assert metrics["capacity"] == pytest.approx(1 * 8 / 16)
    # Thresholds start at 0 and the training forward pass does not read them, so the mean q
    # of the four pools is the same for both decays: one EMA step gives tau(0.5) = tau(0)/2.
    # (Four sequential EMA steps, one per micro-batch, would not.)
    tau = {d: jax.tree.leaves(s) for d, s in states.items()}
    assert len(tau[0.0]) == 1 and np.all(tau[0.0][0] > 0)
    np.testing.assert_allclose(tau[0.5][0], 0.5 * tau[0.0][0], rtol=1e-6)


def test_timestep_buckets_cover_equal_intervals():
    t = jax.numpy.arange(1000)
    np.testing.assert_array_equal(timestep_buckets(t, 10, 1000), np.arange(1000) // 100)
    flow_t = jax.numpy.asarray([0.0, 0.0999, 0.1, 0.55, 0.999999, 1.0])
    np.testing.assert_array_equal(timestep_buckets(flow_t, 10, 1.0), [0, 0, 1, 5, 9, 9])


def test_bucket_losses_are_means_over_the_window_of_each_buckets_samples():
    rng = np.random.default_rng(0)
    steps, k = 3, 4
    t = rng.integers(0, 750, (steps, 16))  # nothing in bucket 3 = [750, 1000)
    loss = rng.uniform(0, 1, (steps, 16))
    history = []
    for s in range(steps):  # what the step returns: per-bucket sums and counts
        bucket = t[s] * k // 1000
        history.append({"loss": np.float32(loss[s].mean()),
                        metrics_lib.BUCKET_SUMS: np.bincount(bucket, loss[s], k),
                        metrics_lib.BUCKET_COUNTS: np.bincount(bucket, minlength=k)})
    means = metrics_lib.window_means(history)
    for b in range(3):
        chosen = (t >= 250 * b) & (t < 250 * (b + 1))
        assert means[f"loss/t_bucket_{b}"] == pytest.approx(loss[chosen].mean())
    assert "loss/t_bucket_3" not in means  # no sample: no value, rather than a made-up 0
    assert means["loss"] == pytest.approx(loss.mean())
