"""Baselines and ablations of the papers' tables: multi-experts (Switch-DiT Table A, DTR
Table 6), DTR Table 8's clustered masks, DiffMoE's static top-K inference (Table 4)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switch_dit_jax import multi_expert
from switch_dit_jax.diffusion.gaussian import GaussianDiffusion
from switch_dit_jax.models import build_model, dtr, layers, moe, moe_baselines

import test_train

QUARTERS = [(0, 250), (250, 500), (500, 750), (750, 1000)]


def test_multi_expert_member_never_sees_a_timestep_outside_its_interval():
    config = test_train.tiny_config(**{"diffusion.t_range": (250, 500)})
    _, _, seen = test_train.train_seeing_dit_calls(config, 3, lambda dit, x, t: t)
    t = np.concatenate(seen)
    assert t.size == 48
    assert t.min() >= 250 and t.max() < 500
    assert t.min() < 300 and t.max() > 450  # the whole interval, not one corner of it


def test_member_intervals_must_tile_the_process():
    np.testing.assert_array_equal(multi_expert.member_starts(QUARTERS, 1000), [0, 250, 500, 750])
    for bad in ([(0, 250), (300, 1000)], [(0, 600), (500, 1000)], [(0, 500), (500, 900)],
                [(500, 1000), (0, 500)], [(0, 0), (0, 1000)]):
        with pytest.raises(ValueError, match="t_ranges"):
            multi_expert.member_starts(bad, 1000)


def test_switching_sampler_calls_the_member_of_every_step():
    diffusion = GaussianDiffusion("linear", 1000, learn_sigma=False, timestep_respacing="40")
    calls = []

    def apply_one(member, x, t, y):
        jax.debug.callback(lambda t, k: calls.append((int(t[0]), int(k))), t, member["id"])
        return jnp.zeros_like(x) + member["id"] * 0.0

    stacked = {"id": jnp.arange(4, dtype=jnp.int32)}
    apply_fn = multi_expert.switching_apply(apply_one, stacked,
                                            multi_expert.member_starts(QUARTERS, 1000))
    jax.block_until_ready(diffusion.p_sample_loop(lambda x, t: apply_fn(x, t, None),
                                                  (2, 4, 4, 1), jax.random.PRNGKey(0)))
    assert sorted(t for t, _ in calls) == sorted(int(t) for t in diffusion.timestep_map)
    assert len(calls) == 40
    for t, member in calls:
        assert member == t // 250, (t, member)  # quarters [0,250), [250,500), ...
    assert {m for _, m in calls} == {0, 1, 2, 3}


def test_cdtr_rows_are_the_dtr_windows_of_their_cluster():
    t_count, c, k = 1000, 64, 8
    masks = dtr.cdtr_masks(t_count, c, k, alpha=4.0, beta=0.8)
    windows = dtr.dtr_masks(k, c, 4.0, 0.8)  # one DTR task per cluster
    for t in range(t_count):
        np.testing.assert_array_equal(masks[t], windows[t // 125])  # ANT: 8 clusters of 125


@pytest.mark.parametrize("c,k", [(64, 8), (768, 8), (30, 4)])
def test_ercddt_shares_half_the_channels_and_splits_the_rest_by_cluster(c, k):
    t_count = 1000
    masks = dtr.ercddt_masks(t_count, c, k)
    shared = c // 2
    assert masks[:, :shared].all()  # half of the channels: every task
    cluster = np.arange(t_count) * k // t_count
    segments = [np.flatnonzero(masks[np.flatnonzero(cluster == j)[0], shared:]) + shared
                for j in range(k)]
    for j in range(k):  # every row of a cluster activates the same segment
        rows = masks[cluster == j]
        assert (rows == rows[0]).all()
    flat = np.concatenate(segments)
    np.testing.assert_array_equal(flat, np.arange(shared, c))  # disjoint, ordered, covering
    sizes = [len(s) for s in segments]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    for s in segments:
        assert np.all(np.diff(s) == 1)  # contiguous


@functools.lru_cache(maxsize=1)
def _static_init(b, s, d, e, f):
    x = jax.random.normal(jax.random.PRNGKey(2), (b, s, d))
    return jax.jit(moe.DiffMoE(e, f).init, static_argnums=2)(jax.random.PRNGKey(1), x, True)


@pytest.mark.parametrize("capacity,k", [(0.9, 18), (0.95, 19), (1.0, 20)])
def test_static_top_k_inference_gives_every_expert_exactly_c_p_over_e_tokens(capacity, k):
    b, s, d, e, f = 4, 20, 8, 4, 16  # pool 80: K = int(C · 80 / 4)
    x = jax.random.normal(jax.random.PRNGKey(2), (b, s, d))
    layer = moe.DiffMoE(e, f, inference="static", static_capacity=capacity)
    # The capacity plays no part in the parameters: one initialisation serves every case.
    variables = nn.unbox(_static_init(b, s, d, e, f))
    variables.pop("aux", None)
    variables["params"]["experts"] = jax.tree.map(
        lambda w: w + 0.1 * jnp.cos(jnp.arange(w.size).reshape(w.shape)),
        variables["params"]["experts"])
    # The predictor and thresholds play no part: thresholds that would keep no token.
    variables["moe_state"] = {"threshold": jnp.full((e,), 2.0)}
    y, state = jax.jit(lambda v, x: layer.apply(v, x, False, mutable=["aux"]))(variables, x)
    np.testing.assert_allclose(state["aux"]["capacity"][0], np.full(e, k * e / (b * s)))
    p = variables["params"]
    pool = np.asarray(x).reshape(b * s, d)
    scores = np.asarray(jax.nn.softmax(pool @ np.asarray(p["router"]), axis=-1))
    expected = np.zeros_like(pool)
    for j in range(e):
        w = p["experts"]
        for token in np.argsort(-scores[:, j], kind="stable")[:k]:
            h = nn.gelu(pool[token] @ w["fc1_kernel"][j] + w["fc1_bias"][j], approximate=True)
            expected[token] += scores[token, j] * np.asarray(h @ w["fc2_kernel"][j]
                                                             + w["fc2_bias"][j])
    np.testing.assert_allclose(np.asarray(y).reshape(b * s, d), expected, rtol=2e-5, atol=2e-6)


def test_swiglu_experts_and_shared_expert_follow_the_official_modules():
    b, s, d, e, f = 2, 6, 8, 4, 16
    x = jax.random.normal(jax.random.PRNGKey(4), (b, s, d))
    layer = moe.DiffMoE(e, f, swiglu=True, shared_experts=1)
    variables = nn.unbox(jax.jit(layer.init, static_argnums=2)(jax.random.PRNGKey(1), x, True))
    variables.pop("aux", None)
    p = jax.tree.map(lambda w: w + 0.05 * jnp.sin(jnp.arange(w.size).reshape(w.shape)),
                     variables["params"])
    variables["params"] = p
    assert {k: v.shape for k, v in p["experts"].items()} == {
        "gate_kernel": (e, d, f), "up_kernel": (e, d, f), "down_kernel": (e, f, d)}
    # DiffMoE's shared expert: one GELU MLP of hidden 2·(r·D) = 8·D (with biases).
    assert p["shared_experts"]["fc1"]["kernel"].shape == (d, 2 * f)
    y, _ = jax.jit(lambda v, x: layer.apply(v, x, True, mutable=["aux", "moe_state"]))(
        variables, x)
    pool = np.asarray(x).reshape(b * s, d)
    scores = np.asarray(jax.nn.softmax(pool @ np.asarray(p["router"]), axis=-1))
    w, sh = p["experts"], p["shared_experts"]
    expected = np.zeros_like(pool)
    for j in range(e):  # training: every expert takes its top C·P/E = 3 tokens
        for token in np.argsort(-scores[:, j], kind="stable")[:3]:
            gate, up = pool[token] @ w["gate_kernel"][j], pool[token] @ w["up_kernel"][j]
            expected[token] += scores[token, j] * np.asarray(
                (gate / (1 + np.exp(-gate)) * up) @ w["down_kernel"][j])
    hidden = nn.gelu(pool @ sh["fc1"]["kernel"] + sh["fc1"]["bias"], approximate=True)
    expected += np.asarray(hidden @ sh["fc2"]["kernel"] + sh["fc2"]["bias"])
    np.testing.assert_allclose(np.asarray(y).reshape(b * s, d), expected, rtol=2e-5, atol=2e-5)
    # TC-DiT / EC-DiT: the shared expert is a SwiGLU of width n·D; dense blocks turn SwiGLU too.
    tc = moe_baselines.TokenChoiceMoE(e, f, shared_experts=2)
    shapes = jax.eval_shape(tc.init, jax.random.PRNGKey(0), x)["params"]["shared_experts"]
    assert nn.unbox(shapes)["ffn"]["gate_proj"]["kernel"].shape == (d, 2 * d)
    model = build_model(dict(name="custom", depth=2, hidden_size=32, num_heads=2, patch_size=4,
                             input_size=8, in_channels=1, num_classes=10,
                             ffn=dict(kind="diffmoe", num_experts=4, swiglu=True)))
    tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)),
                          jnp.zeros((2,)), jnp.zeros((2,), jnp.int32))["params"]
    assert set(tree["blocks_0"]["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    assert "gate_kernel" in tree["blocks_1"]["mlp"]["experts"]


def test_head_dim_decouples_the_attention_width_from_the_model_width():
    b, s, d, heads, head_dim = 2, 5, 32, 2, 24  # inner width 48 != 32
    x = jax.random.normal(jax.random.PRNGKey(6), (b, s, d))
    layer = layers.Attention(heads, head_dim=head_dim)
    p = nn.unbox(jax.jit(layer.init)(jax.random.PRNGKey(0), x))["params"]
    p = jax.tree.map(lambda w: w + 0.02 * jnp.cos(jnp.arange(w.size).reshape(w.shape)), p)
    assert p["qkv"]["kernel"].shape == (d, 3 * heads * head_dim)
    assert p["proj"]["kernel"].shape == (heads * head_dim, d)
    out = jax.jit(layer.apply)({"params": p}, x)
    qkv = (np.asarray(x) @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(b, s, 3, heads,
                                                                           head_dim)
    q, k, v = (np.moveaxis(qkv[:, :, i], 2, 1) for i in range(3))  # [b, h, s, hd]
    logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(head_dim)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    mixed = np.moveaxis(attn @ v, 1, 2).reshape(b, s, heads * head_dim)
    expected = mixed @ p["proj"]["kernel"] + p["proj"]["bias"]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)
    model = build_model(dict(name="custom", depth=1, hidden_size=36, num_heads=5, head_dim=8,
                             patch_size=4, input_size=8, in_channels=1, num_classes=10))
    assert model.head_dim == 8  # 36 is not divisible by 5 heads: head_dim makes it valid
