"""DiT backbone: sizes, official parameter counts and initialisation, structure vs an
independent NumPy port of the official forward pass, masks, dtypes, logical axes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_dit
from switch_dit_jax.models import build_model, convert
from switch_dit_jax.models.dit import DiTBlock

TINY = dict(name="custom", depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8,
            in_channels=3, num_classes=10)


def init(model, batch=2, key=0):
    s, c = model.input_size, model.in_channels
    return model.init(jax.random.PRNGKey(key), jnp.zeros((batch, s, s, c)), jnp.zeros((batch,)),
                      jnp.zeros((batch,), jnp.int32))


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,expected", [("DiT-S/2", 32_963_360), ("DiT-B/2", 130_512_416),
                                           ("DiT-XL/2", 675_129_632)])
def test_official_parameter_counts(name, expected):
    model = build_model(dict(name=name))
    params = nn.unbox(jax.eval_shape(lambda: init(model, 1)))["params"]
    # The official count includes the frozen sin-cos table (256 tokens x D), which is a
    # constant here rather than a parameter.
    assert count(params) + 256 * model.hidden_size == expected


def test_registry_sizes():
    for name, (depth, width, heads, patch) in {"DiT-L/4": (24, 1024, 16, 4),
                                               "DiT-S/8": (12, 384, 6, 8),
                                               "DiT-XL/2": (28, 1152, 16, 2)}.items():
        m = build_model(dict(name=name))
        assert (m.depth, m.hidden_size, m.num_heads, m.patch_size) == (depth, width, heads, patch)


def test_output_is_exactly_zero_at_init():
    model = build_model(dict(name="DiT-S/2"))
    variables = init(model)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 4))
    out = model.apply(variables, x, jnp.array([3, 999]), jnp.array([1, 1000]))
    assert out.shape == (2, 32, 32, 8)
    assert np.all(np.asarray(out) == 0.0)


def test_official_initialisation_statistics():
    model = build_model(dict(name="DiT-S/2"))
    p = nn.unbox(init(model))["params"]
    d = 384
    qkv = np.asarray(p["blocks_0"]["attn"]["qkv"]["kernel"])
    bound = np.sqrt(6 / (d + 3 * d))  # xavier-uniform of the [3D, D] torch weight
    assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.95 * bound
    conv = np.asarray(p["x_embedder"]["proj"]["kernel"])  # torch: xavier on the [D, C*p*p] view
    assert np.abs(conv).max() <= np.sqrt(6 / (4 * 2 * 2 + d))
    assert np.abs(conv).max() > 0.95 * np.sqrt(6 / (4 * 2 * 2 + d))
    for path in (("t_embedder", "mlp_0", "kernel"), ("t_embedder", "mlp_2", "kernel"),
                 ("y_embedder", "embedding_table")):
        w = p
        for k in path:
            w = w[k]
        assert abs(np.std(np.asarray(w)) - 0.02) < 0.001, path
    for i in range(12):
        assert not np.any(np.asarray(p[f"blocks_{i}"]["adaLN_modulation"]["linear"]["kernel"]))
    assert not np.any(np.asarray(p["final_layer"]["linear"]["kernel"]))
    assert not np.any(np.asarray(p["final_layer"]["adaLN_modulation"]["linear"]["kernel"]))
    biases = [np.asarray(b) for path, b in jax.tree_util.tree_flatten_with_path(p)[0]
              if path[-1].key == "bias"]
    assert all(not b.any() for b in biases)


def test_forward_matches_official_reference_through_import():
    cfg = dict(TINY)
    model = build_model(cfg)
    shapes = reference_dit.official_shapes(2, 64, 3, 2, 10, True, 8)
    sd = reference_dit.random_state_dict(shapes, seed=3, scale=0.2)
    params = convert.from_torch_state_dict(sd, cfg)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 8, 3)).astype(np.float32)
    t = np.array([0, 17, 999])
    y = np.array([2, 9, 10])  # 10 = the null class
    out = model.apply({"params": params}, x, t, y)
    ref = reference_dit.forward(sd, x.transpose(0, 3, 1, 2), t, y, 2, 4, 2, 6)
    # float32 sin/cos of t ~ 1000 differ between XLA and NumPy by ~6e-5 and the random weights
    # amplify that; a structural error (layout, order, init) gives O(1) differences instead.
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, rtol=1e-3,
                               atol=1e-4 * np.abs(ref).max())
    assert np.abs(ref).mean() > 1e-2  # the comparison is not between two near-zero outputs


def test_bfloat16_matches_float32():
    shapes = reference_dit.official_shapes(2, 64, 3, 2, 10, True, 8)
    # Weight scale 0.1 keeps the random network out of the chaotic regime (at 0.2 attention
    # logits are so large that any rounding flips the softmax).
    sd = reference_dit.random_state_dict(shapes, seed=4, scale=0.1)
    params = convert.from_torch_state_dict(sd, TINY)
    x = np.random.default_rng(1).standard_normal((4, 8, 8, 3)).astype(np.float32)
    t, y = np.array([1, 200, 500, 999]), np.array([0, 3, 5, 10])
    out32 = build_model(TINY).apply({"params": params}, x, t, y)
    out16 = build_model(dict(TINY, compute_dtype="bfloat16")).apply({"params": params}, x, t, y)
    assert out16.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); matmuls accumulate in f32 and the
    # residual stream and norms stay f32, so the output error stays near 1% (measured 0.8%).
    err = np.abs(np.asarray(out16) - np.asarray(out32)).max() / np.abs(np.asarray(out32)).max()
    assert err < 2e-2, err
    assert err > 0  # really ran in bf16


def test_label_dropout_and_unconditional():
    model = build_model(dict(TINY, class_dropout_prob=0.999999))
    shapes = reference_dit.official_shapes(2, 64, 3, 2, 10, True, 8)
    params = convert.from_torch_state_dict(reference_dit.random_state_dict(shapes, scale=0.2),
                                           TINY)
    x = np.ones((2, 8, 8, 3), np.float32)
    t = np.array([5, 5])
    dropped = model.apply({"params": params}, x, t, np.array([1, 2]), train=True,
                          rngs={"dropout": jax.random.PRNGKey(0)})
    null = model.apply({"params": params}, x, t, np.array([10, 10]))
    np.testing.assert_allclose(dropped, null, rtol=1e-6)
    with pytest.raises(ValueError, match="rngs=\\{'dropout'"):
        model.apply({"params": params}, x, t, np.array([1, 2]), train=True)


def test_unconditional_model_has_the_official_one_row_label_table():
    cfg = dict(TINY, num_classes=1)
    shapes = reference_dit.official_shapes(2, 64, 3, 2, 1, True, 8)
    assert shapes["y_embedder.embedding_table.weight"] == (1, 64)
    sd = reference_dit.random_state_dict(shapes, seed=5, scale=0.2)
    params = convert.from_torch_state_dict(sd, cfg)
    x = np.random.default_rng(2).standard_normal((2, 8, 8, 3)).astype(np.float32)
    t, y = np.array([3, 700]), np.zeros(2, np.int64)
    out = build_model(cfg).apply({"params": params}, x, t, y, train=True,
                                 rngs={"dropout": jax.random.PRNGKey(0)})
    ref = reference_dit.forward(sd, x.transpose(0, 3, 1, 2), t, y, 2, 4, 2, 6)
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, rtol=1e-3,
                               atol=1e-4 * np.abs(ref).max())
    # The row is really added: without it the output changes.
    sd_zero = dict(sd, **{"y_embedder.embedding_table.weight": np.zeros((1, 64), np.float32)})
    ref_zero = reference_dit.forward(sd_zero, x.transpose(0, 3, 1, 2), t, y, 2, 4, 2, 6)
    assert np.abs(ref_zero - ref).max() > 1e-3 * np.abs(ref).max()


def test_block_mask_integration():
    block = DiTBlock(hidden_size=32, num_heads=2)
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
    variables = block.init(jax.random.PRNGKey(0), z, c)
    # Non-zero adaLN so that the block is not the identity.
    variables = jax.tree.map(lambda w: w + 0.1 * jnp.ones_like(w), nn.unbox(variables))
    m = jnp.asarray(rng.uniform(size=(2, 1, 32)) > 0.5, jnp.float32)
    masked = block.apply(variables, z, c, mask=m)
    expected = (1 - m) * z + block.apply(variables, m * z, c)
    np.testing.assert_allclose(masked, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(block.apply(variables, z, c, mask=jnp.ones((2, 1, 32))),
                               block.apply(variables, z, c), rtol=1e-6)


def test_every_parameter_has_logical_axis_names():
    boxed = init(build_model(TINY))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
    assert all(len(v.names) == v.value.ndim for v in leaves)
    # Every weight matrix has exactly one 'embed' axis: that is the axis FSDP shards.
    matrices = [v for v in leaves if v.value.ndim >= 2]
    assert all(v.names.count("embed") == 1 for v in matrices)


@pytest.mark.parametrize("override,field", [
    (dict(name="DiT-M/2"), "model.name"),
    (dict(name="DiT-S/3"), "model.name"),
    (dict(input_size=33), "model.patch_size"),
    (dict(name="custom", depth=None, hidden_size=64, num_heads=4, patch_size=2), "model.depth"),
    (dict(num_heads=5), "model.num_heads"),
    (dict(compute_dtype="float16"), "model.compute_dtype"),
    (dict(num_classes=0), "model.num_classes"),
    (dict(nonsense=1), "nonsense"),
])
def test_bad_model_configs_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build_model(dict(dict(name="DiT-S/2"), **override))


def test_wrong_input_shape_is_one_clear_error():
    model = build_model(TINY)
    with pytest.raises(ValueError, match="NHWC"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 8, 8)), jnp.zeros((1,)))
