"""DiffMoE's official capacity_schedule (models_DiffMoE.py DiT.forward): the training
capacity against the official piecewise formula, and the layer's top-k at a scheduled C."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switch_dit_jax import parallel
from switch_dit_jax.models import build_model, moe, moe_baselines, schedule
from switch_dit_jax.train.state import create_train_state, make_optimizer
from switch_dit_jax.train.step import make_diffusion, make_train_step

import test_train

E, C, STAGE_I, STAGE_II = 4, 1.0, 10, 30


def official(it):
    # models_DiffMoE.py: training_iters <= I -> E; <= II -> C + (E - C)(II - it)/(II - I); else C
    if it <= STAGE_I:
        return E
    if it <= STAGE_II:
        return C + (E - C) * (STAGE_II - it) / (STAGE_II - STAGE_I)
    return C


@pytest.mark.parametrize("step", [0, 10, 11, 20, 29, 30, 31, 500])
def test_capacity_follows_the_official_schedule(step):
    got = float(schedule.scheduled_capacity(step, C, E, STAGE_I, STAGE_II))
    assert got == pytest.approx(official(step), rel=1e-6)


@pytest.mark.parametrize("step", [5, 20, 40])
def test_layer_takes_int_pool_over_e_times_scheduled_capacity_tokens(step):
    b, s, d, f = 2, 8, 8, 16
    layer = moe.DiffMoE(E, f, capacity=C, capacity_schedule=(STAGE_I, STAGE_II))
    x = jax.random.normal(jax.random.PRNGKey(0), (b, s, d))
    params = nn.unbox(layer.init(jax.random.PRNGKey(1), x))
    variables = {**params, "schedule": {"step": jnp.asarray(step, jnp.int32)}}
    _, out = layer.apply(variables, x, train=True, mutable=["aux", "moe_state"])
    dispatch = np.asarray(out["aux"]["dispatch"][0])  # [P, E]
    k = int((b * s / E) * official(step))
    np.testing.assert_array_equal(dispatch.sum(0), k)
    # Each expert's chosen tokens are its k best by gate score.
    scores = jax.nn.softmax(x.reshape(-1, d) @ params["params"]["router"], -1)
    for e in range(E):
        best = np.argsort(-np.asarray(scores[:, e]))[:k]
        assert set(np.flatnonzero(dispatch[:, e])) == set(best)


def test_bad_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match="model.ffn.capacity_schedule"):
        build_model({"name": "DiT-S/2", "ffn": {"kind": "diffmoe", "capacity_schedule": (30, 10)}})


def capacities_of_train_steps(kind: str, steps: int = 6) -> list[float]:
    """The logged C^E of the first `steps` train steps of a tiny DiT with a (2, 4) schedule."""
    config = test_train.tiny_config(**{
        "model.depth": 2, "model.ffn.kind": kind, "model.ffn.num_experts": 4,
        "model.ffn.capacity_schedule": (2, 4)})
    model = build_model(config.model)
    tx = make_optimizer(config.train)
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    state = create_train_state(model, tx, jax.random.PRNGKey(0), mesh)
    step = jax.jit(make_train_step(model, make_diffusion(config), tx, config))
    got = []
    for i in range(steps):
        state, metrics = step(state, test_train.fixed_batch(), jax.random.PRNGKey(i))
        got.append(float(metrics["capacity"]))
    return got


def test_train_step_hands_the_layer_its_step():
    got = capacities_of_train_steps("diffmoe")
    # Official: C = E = 4 up to iteration 2, then 1 + 3·(4 - it)/2, then C_train = 1; the
    # pool (16 images x 4 tokens, 16 per expert at C = 1) makes each value exact.
    np.testing.assert_allclose(got, [4, 4, 4, 2.5, 1, 1], rtol=1e-6)


@pytest.mark.parametrize("step", [5, 20, 25, 40])
def test_ecdit_takes_int_sample_over_e_times_scheduled_capacity_tokens_per_sample(step):
    # models_ECDiT.py: the same schedule, then k = int((S / E) · capacity) per sample.
    b, s, d, f = 3, 8, 8, 16
    layer = moe_baselines.ExpertChoiceMoE(E, f, capacity=C, capacity_schedule=(STAGE_I, STAGE_II))
    x = jax.random.normal(jax.random.PRNGKey(2), (b, s, d))
    params = {"params": nn.unbox(layer.init(jax.random.PRNGKey(3), x))["params"]}
    variables = {**params, "schedule": {"step": jnp.asarray(step, jnp.int32)}}
    y, out = layer.apply(variables, x, train=True, mutable=["aux", "moe_state"])
    k = int((s / E) * official(step))
    np.testing.assert_allclose(np.asarray(out["aux"]["capacity"][0]), k * E / s, rtol=1e-6)
    # A layer whose constant C_train gives the same k computes the same output.
    fixed = moe_baselines.ExpertChoiceMoE(E, f, capacity=k * E / s)
    np.testing.assert_allclose(fixed.apply(params, x, train=True, mutable=["aux"])[0], y,
                               atol=1e-5, rtol=0)
    # Outside the train step (no schedule collection) the layer uses C_train.
    plain = moe_baselines.ExpertChoiceMoE(E, f, capacity=C)
    np.testing.assert_allclose(
        layer.apply(params, x, train=True, mutable=["aux"])[0],
        plain.apply(params, x, train=True, mutable=["aux"])[0], atol=1e-6, rtol=0)


def test_ecdit_train_step_follows_the_schedule_and_other_kinds_refuse_it():
    got = capacities_of_train_steps("expert_choice")
    # 4 tokens per sample: k = int(4/4 · C) = 4, 4, 4, int(2.5) = 2, 1, 1 -> C^E = k · E / S.
    np.testing.assert_allclose(got, [4, 4, 4, 2, 1, 1], rtol=1e-6)
    with pytest.raises(ValueError, match="applies to model.ffn.kind 'diffmoe' or "
                                         "'expert_choice', not 'token_choice'"):
        build_model({"name": "DiT-S/2", "ffn": {"kind": "token_choice",
                                                 "capacity_schedule": (1, 2)}})
