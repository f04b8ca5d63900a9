"""DTR / R-TR masks, Switch-DiT routers, the diffusion prior, and loss weighting."""
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import linear_sum_assignment

from switch_dit_jax.diffusion import weighting
from switch_dit_jax.diffusion.gaussian import GaussianDiffusion
from switch_dit_jax.models import build_model, dtr, switch
from switch_dit_jax.models.layers import TimestepEmbedder

import test_train


def pseudo_code_dtr(T, C, alpha, beta):
    """DTR Appendix A.2, Pseudo Code 1 (right), line by line."""
    mask = np.zeros((T, C))
    num_activ = int(beta * C)
    num_deact = C - num_activ
    x = np.linspace(0, 1, T) ** alpha
    offset = (num_deact * x).round()
    for t in range(T):
        start = int(offset[t])
        mask[t, start:start + num_activ] = 1
    return mask


@pytest.mark.parametrize("T,C,alpha,beta", [(1000, 1152, 4.0, 0.8), (1000, 384, 4.0, 0.8),
                                            (50, 64, 1.0, 0.6), (7, 10, 2.0, 0.5),
                                            (1000, 36, 4.0, 2 / 3)])
def test_dtr_masks_follow_the_pseudo_code_and_eq4(T, C, alpha, beta):
    masks = dtr.dtr_masks(T, C, alpha, beta)
    np.testing.assert_array_equal(masks, pseudo_code_dtr(T, C, alpha, beta))
    active = int(beta * C)
    assert masks.shape == (T, C) and np.all(masks.sum(1) == active)
    assert masks[0, :active].all() and masks[-1, C - active:].all()  # first and last rows
    starts = masks.argmax(1)
    assert np.all(np.diff(starts) >= 0)  # the window only slides forward
    # Eq. 4 (1-based t, floors) uses x = t/T where the code uses t/(T-1): |Δx| <= 1/T moves
    # (C - Cβ)·x^α by at most α(C - Cβ)/T, and round(A) - floor(B) < A - B + 1.5.
    eq4_starts = np.floor((C - active) * (np.arange(T) / T) ** alpha)
    assert np.abs(starts - eq4_starts).max() < 1.5 + alpha * (C - active) / T


def test_random_masks_activate_exactly_beta_c_per_row():
    masks = dtr.random_masks(100, 64, 0.8, seed=3)
    assert np.all(masks.sum(1) == int(0.8 * 64))
    np.testing.assert_array_equal(masks, dtr.random_masks(100, 64, 0.8, seed=3))
    assert len({m.tobytes() for m in masks}) > 90  # every task draws its own channels
    with pytest.raises(ValueError, match="beta"):
        dtr.random_masks(10, 8, 1.5, seed=0)


TINY = dict(name="custom", depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8,
            in_channels=1, num_classes=10)


def init_params(model, seed=0):
    x = jnp.zeros((2, model.input_size, model.input_size, model.in_channels))
    variables = model.init(jax.random.PRNGKey(seed), x, jnp.zeros(2), jnp.zeros(2, jnp.int32))
    return nn.unbox(variables)["params"]


@pytest.mark.parametrize("routing", [dict(kind="switch"), dict(kind="dtr", beta=1.0)])
def test_routed_models_at_init_equal_dit_with_shared_weights(routing):
    dit = build_model(TINY)
    routed = build_model(dict(TINY, routing=routing))
    shared = init_params(dit, seed=1)
    # Non-zero adaLN and final layer, so that the comparison is not between zeros.
    shared = jax.tree.map(lambda w: w + 0.05 * jnp.sin(jnp.arange(w.size).reshape(w.shape)),
                          shared)
    params = dict(init_params(routed), **shared)
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 8, 1))
    t, y = jnp.array([0, 500, 999]), jnp.array([1, 4, 10])
    out_dit = dit.apply({"params": shared}, x, t, y)
    out_routed = routed.apply({"params": params}, x, t, y)
    np.testing.assert_allclose(out_routed, out_dit, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(out_dit)).mean() > 1e-3


def test_dtr_routing_uses_the_row_of_the_original_timestep():
    model = build_model(dict(TINY, routing=dict(kind="dtr")))
    params = init_params(model)
    params = jax.tree.map(lambda w: w + 0.05 * jnp.cos(jnp.arange(w.size).reshape(w.shape)),
                          params)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
    y = jnp.array([3, 3])
    a = model.apply({"params": params}, x, jnp.array([999, 999]), y)
    b = model.apply({"params": params}, x, jnp.array([0, 999]), y)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)
    assert not np.allclose(a[0], b[0])


@pytest.mark.parametrize("name,total,activated", [("DiT-S/2", 38_299_460, 36_525_380),
                                                  ("DiT-B/2", 151_801_412, 144_714_308),
                                                  ("DiT-XL/2", 786_799_988, 749_608_820)])
def test_switch_dit_parameter_counts(name, total, activated):
    def count(model):
        shapes = jax.eval_shape(lambda: init_params(model))
        return sum(math.prod(v.shape) for v in jax.tree.leaves(shapes))

    model = build_model(dict(name=name, routing=dict(kind="switch")))
    pos = 256 * model.hidden_size  # the official counts include the frozen sin-cos table
    n = count(model) + pos
    d, m, k = model.hidden_size, 3, 2
    assert n == total
    assert n - model.depth * (m - k) * (d * d + d) == activated  # k of M experts per block
    assert count(build_model(dict(name=name, routing=dict(kind="dtr")))) == \
        count(build_model(dict(name=name)))  # DTR adds no parameters


def brute_force_assignment_cost(cost):
    n = cost.shape[0]
    return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))


def test_assignment_is_optimal():
    rng = np.random.default_rng(0)
    for n in (1, 2, 4, 6):
        for _ in range(5):
            cost = rng.integers(0, 20, (n, n)).astype(np.float32)
            match = np.asarray(jax.jit(switch.optimal_assignment)(jnp.asarray(cost)))
            assert sorted(match) == list(range(n))
            assert cost[np.arange(n), match].sum() == brute_force_assignment_cost(cost)
    cost = rng.integers(0, 1000, (84, 84)).astype(np.float32)
    match = np.asarray(switch.optimal_assignment(jnp.asarray(cost)))
    rows, cols = linear_sum_assignment(cost)
    assert cost[np.arange(84), match].sum() == cost[rows, cols].sum()


def test_matching_cost_is_the_l1_distance_of_columns():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, (30, 6)).astype(np.float32)
    b = rng.integers(0, 2, (30, 6)).astype(np.float32)
    expected = np.abs(a[:, :, None] - b[:, None, :]).sum(0)
    np.testing.assert_array_equal(switch.matching_cost(jnp.asarray(a), jnp.asarray(b)), expected)


def test_jensen_shannon_properties():
    rng = np.random.default_rng(2)
    p, q = rng.dirichlet(np.ones(9), 5), rng.dirichlet(np.ones(9), 5)
    jpq, jqp = switch.jensen_shannon(p, q), switch.jensen_shannon(q, p)
    np.testing.assert_allclose(jpq, jqp, rtol=1e-6)
    assert np.all(np.asarray(jpq) > 0) and np.all(np.asarray(jpq) <= math.log(2))
    np.testing.assert_allclose(switch.jensen_shannon(p, p), 0.0, atol=1e-6)
    disjoint = switch.jensen_shannon(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))
    assert abs(float(disjoint) - math.log(2)) < 1e-4  # the bound, up to eps = 1e-6


def test_prior_map_is_eq7():
    n, m, k, T = 12, 3, 2, 1000
    w = switch.prior_activation_map(n, m, k, T, 4.0)
    assert w.shape == (T, n * m) and np.all(w.sum(1) == k * n)
    t = np.arange(1, T + 1)  # Eq. 7 with 1-based t: window (floor-ish start, start + kN]
    lo = np.rint(n * (m - k) * ((t - 1) / T) ** 4)
    assert np.abs(w.argmax(1) - lo).max() <= 1


def test_prior_loss_alone_drives_gates_to_the_prior():
    """A toy Switch gate stack (N=3, M=3, k=2, T=16) trained only on L_dp: its top-k map,
    matched optimally, equals w_prior exactly."""
    n, m, k, T = 3, 3, 2, 16
    w_prior = jnp.asarray(switch.prior_activation_map(n, m, k, T, 4.0))

    class Gates(nn.Module):
        @nn.compact
        def __call__(self, t):
            e = TimestepEmbedder(32)(t)
            return jnp.stack([jax.nn.softmax(nn.Dense(m)(nn.silu(e))) for _ in range(n)], 1)

    gates = Gates()
    t_all = jnp.arange(T)
    params = gates.init(jax.random.PRNGKey(0), t_all)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        loss, g = jax.value_and_grad(lambda p: switch.diffusion_prior_loss(
            gates.apply(p, t_all), t_all, w_prior, k, key))(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    for i in range(1500):
        params, opt, loss = step(params, opt, jax.random.PRNGKey(i))
    w_gate = switch.gate_activation_map(gates.apply(params, t_all), k)
    cost = switch.matching_cost(w_gate, w_prior)
    match = np.asarray(switch.optimal_assignment(cost))
    np.testing.assert_array_equal(np.asarray(w_prior)[:, match], np.asarray(w_gate))
    assert float(loss) < 0.05


def test_random_allocation_gates():
    g = switch.random_allocation_gates(4, 3, 2, 100, 4.0, seed=0)
    assert g.shape == (4, 100, 3)
    np.testing.assert_allclose(g.sum(-1), 1.0)  # k experts with gate 1/k each
    assert np.all(g[:, :, 0] == 0.5)  # the shared expert
    np.testing.assert_array_equal(g[:, :, 1] + g[:, :, 2], 0.5)


DIFF = GaussianDiffusion(schedule="linear", num_timesteps=1000)


def test_min_snr_and_p2_weights_follow_their_formulas():
    acp = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    t = np.array([0, 10, 300, 999])
    snr = acp[t] / (1 - acp[t])
    np.testing.assert_allclose(weighting.mse_weights("min_snr", acp, t, min_snr_gamma=5.0),
                               np.minimum(snr, 5.0) / snr, rtol=1e-6)
    np.testing.assert_allclose(weighting.mse_weights("p2", acp, t, p2_gamma=0.5, p2_k=1.0),
                               1 / np.sqrt(1 + snr), rtol=1e-6)
    np.testing.assert_array_equal(weighting.mse_weights("constant", acp, t), 1.0)
    with pytest.raises(ValueError, match="loss.weighting"):
        weighting.mse_weights("focal", acp, t)


def test_ant_uw_sampling_covers_every_cluster_and_loss_formula():
    t = np.asarray(weighting.stratified_timesteps(jax.random.PRNGKey(0), 64, 1000, 8))
    clusters = t // 125
    np.testing.assert_array_equal(clusters, np.repeat(np.arange(8), 8))
    per_sample = jnp.arange(64, dtype=jnp.float32)
    s = jnp.linspace(-1, 1, 8)
    expected = sum(0.5 * (math.exp(-float(s[k])) * float(per_sample[8 * k:8 * k + 8].mean()) / 8
                          + float(s[k])) for k in range(8))
    np.testing.assert_allclose(weighting.uncertainty_weighted_loss(per_sample, s), expected,
                               rtol=1e-6)


def routed_config(**overrides):
    base = {"model.routing.kind": "switch", "model.depth": 2, "loss.load_balance_weight": 0.01,
            "model.routing.noisy_gating": True}
    return test_train.tiny_config(**dict(base, **overrides))


@pytest.mark.parametrize("weighting_kind", ["ant_uw", "p2"])
def test_routed_train_step_on_8_devices_matches_1_device(weighting_kind):
    from switch_dit_jax.train.state import make_optimizer
    from switch_dit_jax.train.step import make_diffusion, make_train_step

    config = routed_config(**{"loss.weighting": weighting_kind})
    model = build_model(config.model)
    tx = make_optimizer(config.train, config.loss)
    step_fn = make_train_step(model, make_diffusion(config), tx, config)
    results = test_train.steps_on_1_and_8_devices(model, tx, step_fn, test_train.fixed_batch(),
                                                  3, loss_config=config.loss)
    assert results[0][1]["prior_loss"] > 0 and results[0][1]["load_balance_loss"] > 0
    if weighting_kind == "ant_uw":  # the log-variances move at their own rate (Adam, 0.025)
        log_var = results[0][0]["ant_uw"]["log_var"]
        assert np.all(np.abs(log_var) > 0.02) and np.all(np.abs(log_var) <= 3 * 0.025 + 1e-6)
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=5e-5, atol=5e-6)


def test_routing_pictures_from_a_switch_model(tmp_path):
    from PIL import Image

    from switch_dit_jax.analysis import routing as routing_analysis

    model = build_model(dict(TINY, routing=dict(kind="switch", num_tasks=100)))
    params = init_params(model)
    paths = routing_analysis.routing_pictures(model, params, str(tmp_path))
    gate_vs_prior = np.asarray(Image.open(paths["gate_vs_prior"]))
    assert gate_vs_prior.shape[0] > 100 and gate_vs_prior.std() > 0
    assert Image.open(paths["denoising_paths"]).size[0] > 4 * 3 * 16
    probs = routing_analysis.gate_probabilities(model, params)
    assert probs.shape == (100, 2, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    w_gate, w_prior = routing_analysis.matched_maps(probs, 2, 4.0)
    assert w_gate.shape == w_prior.shape == (100, 6) and np.all(w_gate.sum(1) == 4)
    with pytest.raises(ValueError, match="Switch-DiT"):
        routing_analysis.gate_probabilities(build_model(TINY), init_params(build_model(TINY)))
