"""DiffMoE / TC-DiT / EC-DiT mixture layers against brute force on tiny pools."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switch_dit_jax.models import build_model, moe, moe_baselines

B, S, D, E, F = 3, 4, 8, 4, 16


def tokens(seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, S, D))


def init(layer, x, train=True):
    variables = layer.init(jax.random.PRNGKey(1), x, train)
    variables = nn.unbox(variables)
    variables.pop("aux", None)
    # Non-zero biases so that a wrong gather/scatter cannot hide behind zeros.
    variables["params"]["experts"] = jax.tree.map(
        lambda w: w + 0.1 * jnp.cos(jnp.arange(w.size).reshape(w.shape)),
        variables["params"]["experts"])
    return variables


def expert_fn(params, e, x):
    p = params["experts"]
    h = nn.gelu(x @ p["fc1_kernel"][e] + p["fc1_bias"][e], approximate=True)
    return h @ p["fc2_kernel"][e] + p["fc2_bias"][e]


def scores_of(params, pool):
    return np.asarray(jax.nn.softmax(pool @ params["router"], axis=-1))  # [P, E]


@pytest.mark.parametrize("name,experts,heads,paper", [("DiT-S/2", 16, 16, 139e6),
                                                      ("DiT-B/2", 16, None, 555e6),
                                                      ("DiT-L/2", 8, None, 1.176e9),
                                                      ("DiT-L/2", 16, None, 1.982e9)])
def test_diffmoe_parameter_counts_match_table1(name, experts, heads, paper):
    cfg = {"name": name, "ffn": {"kind": "diffmoe", "num_experts": experts}}
    if heads:
        cfg["num_heads"] = heads  # the paper's S-E16 uses 16 heads
    model = build_model(cfg)
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)),
        jnp.zeros((1,), jnp.int32)))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nn.unbox(shapes)["params"]))
    assert abs(n / paper - 1) < 0.02, n


def test_diffmoe_training_is_expert_choice_over_the_global_pool():
    layer = moe.DiffMoE(E, F)
    x = tokens()
    variables = init(layer, x)
    y, state = layer.apply(variables, x, True, mutable=["aux", "moe_state"])
    pool = np.asarray(x).reshape(B * S, D)
    scores = scores_of(variables["params"], pool)
    k = B * S // E  # C_train = 1: every expert takes exactly pool / E tokens
    dispatch = np.asarray(state["aux"]["dispatch"][0])
    assert np.all(dispatch.sum(0) == k)
    expected = np.zeros_like(pool)
    for e in range(E):
        chosen = np.argsort(-scores[:, e], kind="stable")[:k]
        assert set(np.flatnonzero(dispatch[:, e])) == set(chosen)
        for p in chosen:  # each token: the gated sum of the experts that chose it
            expected[p] += scores[p, e] * np.asarray(expert_fn(variables["params"], e, pool[p]))
    np.testing.assert_allclose(np.asarray(y).reshape(B * S, D), expected, rtol=2e-5, atol=2e-6)


def test_diffmoe_thresholds_follow_eq17_and_predictor_is_detached():
    layer = moe.DiffMoE(E, F)
    x = tokens(2)
    variables = init(layer, x)
    variables["moe_state"] = {"threshold": jnp.full((E,), 0.3)}
    _, state = layer.apply(variables, x, True, mutable=["aux", "moe_state"])
    logits = np.asarray(state["aux"]["capacity_logits"][0])
    k = B * S // E
    kth = np.sort(1 / (1 + np.exp(-logits)), axis=0)[::-1][k - 1]  # K-th largest per expert
    np.testing.assert_allclose(state["moe_state"]["threshold"], 0.95 * 0.3 + 0.05 * kth,
                               rtol=1e-6)

    def capacity_loss(params, x):
        _, s = layer.apply({**variables, "params": params}, x, True, mutable=["aux", "moe_state"])
        lg, target = s["aux"]["capacity_logits"][0], s["aux"]["dispatch"][0]
        return jnp.mean(jax.nn.softplus(lg) - lg * target)

    g_params, g_x = jax.grad(capacity_loss, argnums=(0, 1))(variables["params"], x)
    assert not np.any(np.asarray(g_x))  # stop_gradient: nothing reaches the backbone
    assert not any(np.any(np.asarray(v)) for v in jax.tree.leaves(g_params["experts"]))
    assert not np.any(np.asarray(g_params["router"]))
    assert np.any(np.asarray(g_params["capacity_fc2"]["kernel"]))


@pytest.mark.parametrize("mode,k", [("dynamic", None), ("interval", None),
                                    ("dynamic", 0), ("dynamic", 1), ("dynamic", 4)])
def test_diffmoe_inference_uses_the_predicted_capacity(mode, k):
    """k: every τ_e sits between expert e's k-th and (k+1)-th highest prediction, so K^E = k
    for all e and inference runs in a small capacity bucket (12 tokens: 12, 6, 3, 2, 1)."""
    layer = moe.DiffMoE(E, F, inference=mode, interval_threshold=0.55)
    x = tokens(3)
    variables = init(layer, x)
    _, train_state = layer.apply(variables, x, True, mutable=["aux", "moe_state"])
    prob = 1 / (1 + np.exp(-np.asarray(train_state["aux"]["capacity_logits"][0])))
    ranked = np.concatenate([np.ones((1, E)), -np.sort(-prob, axis=0)])
    tau = jnp.array([0.3, 0.5, 0.7, 0.9]) if k is None else jnp.asarray(
        (ranked[k] + ranked[k + 1]) / 2)
    variables["moe_state"] = {"threshold": tau}
    y, state = layer.apply(variables, x, False, mutable=["aux"])
    pool = np.asarray(x).reshape(B * S, D)
    scores = scores_of(variables["params"], pool)
    thresholds = np.asarray(tau) if mode == "dynamic" else np.full(E, 0.55)
    k_pred = (prob > thresholds[None]).sum(0)
    if k is not None:
        assert np.all(k_pred == k)
    np.testing.assert_allclose(state["aux"]["capacity"][0], k_pred * E / (B * S), rtol=1e-6)
    expected = np.zeros_like(pool)
    for e in range(E):
        for p in np.argsort(-scores[:, e], kind="stable")[:k_pred[e]]:
            expected[p] += scores[p, e] * np.asarray(expert_fn(variables["params"], e, pool[p]))
    np.testing.assert_allclose(np.asarray(y).reshape(B * S, D), expected, rtol=2e-5, atol=2e-6)


def test_capacity_buckets_halve_the_pool():
    assert moe.capacity_buckets(12, 6) == [12, 6, 3, 2, 1]
    assert moe.capacity_buckets(8192, 6) == [8192, 4096, 2048, 1024, 512, 256]
    assert moe.capacity_buckets(8192, 1) == [8192]


def test_token_choice_is_the_gated_sum_of_each_tokens_top_k():
    layer = moe_baselines.TokenChoiceMoE(E, F, top_k=2)
    x = tokens(4)
    variables = init(layer, x)
    y, state = layer.apply(variables, x, True, mutable=["aux"])
    pool = np.asarray(x).reshape(B * S, D)
    scores = scores_of(variables["params"], pool)
    expected = np.zeros_like(pool)
    for p in range(B * S):
        for e in np.argsort(-scores[p])[:2]:  # unnormalised softmax gates
            expected[p] += scores[p, e] * np.asarray(expert_fn(variables["params"], e, pool[p]))
    np.testing.assert_allclose(np.asarray(y).reshape(B * S, D), expected, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(state["aux"]["balance_probs"][0], scores.mean(0), rtol=1e-5)


def test_expert_choice_picks_within_each_sample():
    layer = moe_baselines.ExpertChoiceMoE(E, F, capacity=2.0)
    x = tokens(5)
    variables = init(layer, x)
    y = np.asarray(layer.apply(variables, x, True, mutable=["aux"])[0])
    k = int(S / E * 2.0)
    for b in range(B):
        sample = np.asarray(x[b])
        scores = scores_of(variables["params"], sample)
        expected = np.zeros_like(sample)
        for e in range(E):
            for s in np.argsort(-scores[:, e], kind="stable")[:k]:
                expected[s] += scores[s, e] * np.asarray(
                    expert_fn(variables["params"], e, sample[s]))
        np.testing.assert_allclose(y[b], expected, rtol=2e-5, atol=2e-6)


def test_mixtures_sit_in_the_odd_blocks():
    model = build_model({"name": "custom", "depth": 4, "hidden_size": 32, "num_heads": 2,
                         "patch_size": 2, "input_size": 8, "in_channels": 1, "num_classes": 10,
                         "ffn": {"kind": "diffmoe", "num_experts": 4}})
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)), jnp.zeros(2),
                           jnp.zeros(2, jnp.int32))
    params = variables["params"]
    assert ["experts" in params[f"blocks_{i}"]["mlp"] for i in range(4)] == \
        [False, True, False, True]
    assert set(variables["moe_state"]) == {"blocks_1", "blocks_3"}


@pytest.mark.parametrize("objective,sampler", [("flow", "heun"), ("gaussian", "ddim")])
def test_capacity_report_during_sampling(tmp_path, objective, sampler):
    """A tiny DiffMoE trained a few steps: sampling records C^E for every step and layer."""
    import test_train
    from switch_dit_jax import parallel
    from switch_dit_jax.analysis import capacity
    from switch_dit_jax.train.state import create_train_state, make_optimizer, state_shardings

    config = test_train.tiny_config(**{
        "diffusion.objective": objective, "sample.sampler": sampler, "sample.num_steps": 3,
        "model.learn_sigma": objective == "gaussian", "model.depth": 4,
        "model.ffn.kind": "diffmoe", "model.ffn.num_experts": 4})
    model = build_model(config.model)
    tx = make_optimizer(config.train, config.loss)
    mesh = parallel.make_mesh(config.mesh)
    _, shardings = state_shardings(model, tx, mesh, config.loss)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), mesh, config.loss)
    state = state.replace(ema_model_state={"moe_state": jax.tree.map(
        lambda v: jnp.full_like(v, 0.5), state.ema_model_state["moe_state"])})
    summary = capacity.report(model, config, state, mesh, shardings, str(tmp_path))
    steps = len(summary["t"])
    assert steps == (3 if sampler == "ddim" else 4)  # Heun evaluates t = 0, 1/3, 2/3, 1
    per_layer = np.asarray(summary["c_infer_per_layer"])
    assert per_layer.shape == (steps, 2) and np.all(per_layer >= 0) and np.all(per_layer <= 4)
    assert summary["c_infer_avg"] == pytest.approx(per_layer.mean())
    assert (tmp_path / "capacity.png").exists() and (tmp_path / "capacity.json").exists()
    # Eq. 40 at C = N_E counts every parameter; at C = 0 only 1/(1 + N_E) of the FFNs.
    n_total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state.ema_params))
    assert capacity.activated_parameters(state.ema_params, 4.0, 4) == pytest.approx(n_total)
    assert capacity.activated_parameters(state.ema_params, 0.0, 4) < n_total


def test_inference_benchmark_runs_and_its_variants_agree(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "diffmoe_inference.py"),
                    "--width=16", "--experts=4", "--samples=2", "--tokens=16", "--repeats=1",
                    f"--out={out}"], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["max_abs_difference"] < 1e-6
    assert result["max_K"] == 16 and result["bucket"] == 16  # 2 x pool / E of a 32-token pool
    assert result["C_infer"] == pytest.approx(1.25, abs=0.1)


def test_token_choice_balance_loss_is_summed_over_layers():
    """DiffMoE Table 3's TC-DiT: the official code adds α·E·Σ_e P_e f_e of every layer."""
    from switch_dit_jax.train.step import mixture_losses
    rng = np.random.default_rng(0)
    aux, want = {}, 0.0
    for i in (1, 3, 5):
        p = rng.dirichlet(np.ones(8))
        f = rng.dirichlet(np.ones(8))
        aux[f"blocks_{i}"] = {"mlp": {"balance_probs": (jnp.asarray(p),),
                                      "balance_fraction": (jnp.asarray(f),)}}
        want += 8 * np.sum(p * f)
    got = float(mixture_losses(aux, 6)["load_balance_loss"])
    assert got == pytest.approx(want, rel=1e-6)
