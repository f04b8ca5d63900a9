"""Official initialisations the papers' numbers depend on: TC-DiT's router, R-TR's tables per
block (and the unconditional label table, in test_dit.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switch_dit_jax.models import build_model, dtr, moe, moe_baselines


def test_token_choice_router_starts_as_torch_kaiming_uniform_a_sqrt5():
    d, e = 512, 16
    x = jnp.zeros((2, 4, d))
    tc = nn.unbox(jax.jit(moe_baselines.TokenChoiceMoE(e, 8).init)(jax.random.PRNGKey(0), x))
    tc = tc["params"]["router"]
    w = np.asarray(tc)
    assert w.shape == (d, e)
    # torch: gain sqrt(2 / (1 + a^2)) = sqrt(1/3), bound gain·sqrt(3 / fan_in) = 1/sqrt(D).
    bound = 1 / np.sqrt(d)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    # U(-b, b) has std b/sqrt(3); 8192 draws estimate it to ~1%.
    assert abs(w.std() - 1 / np.sqrt(3 * d)) < 0.03 / np.sqrt(3 * d)
    assert abs(w.mean()) < 0.05 / np.sqrt(3 * d)
    dm = nn.unbox(jax.jit(moe.DiffMoE(e, 8).init)(jax.random.PRNGKey(0), x))["params"]["router"]
    assert abs(np.asarray(dm).std() - 0.006) < 0.0003  # DiffMoE keeps N(0, 0.006)


def test_random_routing_tables_differ_per_block_and_come_from_the_seed():
    t_count, c, beta = 200, 48, 0.75
    tables = [dtr.random_masks(t_count, c, beta, seed=7, block=i) for i in range(3)]
    for table in tables:
        assert table.shape == (t_count, c) and np.all(table.sum(1) == int(beta * c))
        assert set(np.unique(table)) == {0.0, 1.0}
    # Independent blocks: two random 36-of-48 rows coincide with probability 1/C(48, 36).
    for i in range(3):
        for j in range(i):
            assert not np.any(np.all(tables[i] == tables[j], axis=1))
    np.testing.assert_array_equal(tables[1], dtr.random_masks(t_count, c, beta, seed=7, block=1))
    assert np.mean(tables[0] != dtr.random_masks(t_count, c, beta, seed=8, block=0)) > 0.2
    # The rows a model draws for a batch of timesteps are those rows of the block's table.
    t = jnp.array([5, 199, 5, 0])
    np.testing.assert_array_equal(dtr.random_mask_rows(7, 2, t, c, beta), tables[2][np.asarray(t)])


def test_random_routing_model_masks_block_i_with_table_i():
    cfg = dict(name="custom", depth=3, hidden_size=32, num_heads=2, patch_size=4, input_size=8,
               in_channels=1, num_classes=1, routing=dict(kind="random", num_tasks=50, seed=3,
                                                          beta=0.5))
    model = build_model(cfg)
    x, t = jnp.zeros((2, 8, 8, 1)), jnp.array([4, 31])
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x, t)
    seen = {}

    def record(next_fn, args, kwargs, context):
        if context.method_name == "__call__" and (context.module.name or "").startswith("blocks_"):
            name = context.module.name  # args: (x, c, mask, train)
            jax.debug.callback(lambda m: seen.__setitem__(name, np.asarray(m)), args[2])
        return next_fn(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.jit(model.apply)(variables, x, t)
    assert sorted(seen) == ["blocks_0", "blocks_1", "blocks_2"]
    for i in range(3):
        table = dtr.random_masks(50, 32, 0.5, seed=3, block=i)
        np.testing.assert_array_equal(seen[f"blocks_{i}"][:, 0], table[[4, 31]])
    assert not np.array_equal(seen["blocks_0"], seen["blocks_1"])
