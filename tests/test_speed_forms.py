"""The fast forms of the model code compute what the plain forms compute, value and gradient.

The speed work (models/attention.py, the 2-D Dense, the LayerNorm and the GELU with their own
backward, the block-boundary materialisation, Switch-DiT's per-sample expert mixing) must not
change the math. Each is compared with plain autodiff of an independent formulation: the
NumPy-layout reference DiT of tests/reference_dit.py run through jax.numpy,
jax.nn.dot_product_attention, the float64 GELU and the per-expert sum of Switch-DiT's Eq. 6.
"""
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_dit
from switch_dit_jax.models import attention, build_model, convert, layers, switch
from switch_dit_jax.models.switch import SwitchRouter

TINY = dict(name="custom", depth=3, hidden_size=64, num_heads=4, patch_size=2, input_size=8,
            in_channels=3, num_classes=10)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def test_dit_gradients_equal_plain_autodiff_of_the_reference_forward():
    shapes = reference_dit.official_shapes(3, 64, 3, 2, 10, True, 8)
    sd = reference_dit.random_state_dict(shapes, seed=5, scale=0.1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 8, 3)).astype(np.float32)
    t, y = np.array([3, 400, 998]), np.array([1, 7, 10])
    probe = rng.standard_normal((3, 8, 8, 6)).astype(np.float32)

    def ref_loss(sd_j):
        out = reference_dit.forward(sd_j, jnp.asarray(x).transpose(0, 3, 1, 2), jnp.asarray(t),
                                    jnp.asarray(y), 3, 4, 2, 6, xp=jnp)
        return jnp.sum(out.transpose(0, 2, 3, 1) * probe)

    sd_j = {k: jnp.asarray(v) for k, v in sd.items()}
    ref_grads = jax.grad(ref_loss)(sd_j)
    ref_grads["pos_embed"] = sd["pos_embed"]  # frozen here; the import checks its values
    want = convert.from_torch_state_dict({k: np.asarray(v) for k, v in ref_grads.items()}, TINY)

    model = build_model(TINY)
    params = convert.from_torch_state_dict(sd, TINY)
    got = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t, y) * probe)))(params)
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        assert rel_err(g, flat_want[path]) < 1e-4, jax.tree_util.keystr(path)
    assert np.abs(np.asarray(jax.tree.leaves(got)[0])).max() > 0


@pytest.mark.parametrize("s_q,batch,cores", [(7, 2, 1), (16, 2, 2), (16, 4, 4), (7, 3, 2)])
def test_xla_attention_kernel_equals_dot_product_attention(s_q, batch, cores, monkeypatch):
    # `cores` sets how many sample groups the CPU kernel splits the batch into (cpu_chains).
    monkeypatch.setattr(attention, "_cores", lambda: cores)
    monkeypatch.setattr(attention.cpu_tuning, "onednn_active", lambda: False)
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, s_q, 3, 8)), jnp.float32)
               for _ in range(3))
    probe = jnp.asarray(rng.standard_normal((batch, s_q, 3, 8)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * probe)

    ours = lambda q, k, v: attention.multi_head_attention(q, k, v, "xla")  # noqa: E731
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")  # noqa
    assert rel_err(ours(q, k, v), ref(q, k, v)) < 1e-5
    for a, b in zip(jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
        assert rel_err(a, b) < 1e-5
    low = attention.multi_head_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), "xla")
    assert low.dtype == jnp.bfloat16 and rel_err(low, ref(q, k, v)) < 3e-2


@pytest.mark.parametrize("batch,platform,devices,cores,onednn,want", [
    (8, "cpu", 1, 2, False, 2), (8, "cpu", 1, 1, False, 1), (7, "cpu", 1, 2, False, 1),
    (12, "cpu", 1, 8, False, 6), (1, "cpu", 1, 16, False, 1), (8, "cpu", 8, 2, False, 1),
    (8, "cpu", 1, 2, True, 1), (8, "gpu", 1, 2, False, 1), (8, "tpu", 1, 4, False, 1)])
def test_cpu_attention_chains(batch, platform, devices, cores, onednn, want):
    assert attention.cpu_chains(batch, platform, devices, cores, onednn) == want


@pytest.mark.parametrize("shape", [(2, 5, 7), (4, 7)])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_equals_flax_dense_in_parameters_outputs_and_gradients(shape, use_bias, dtype):
    # layers.Dense adds the bias after reshaping on CPU, before it elsewhere; both are x W + b.
    x = jnp.asarray(np.random.default_rng(3).standard_normal(shape), jnp.float32)
    kwargs = dict(features=6, use_bias=use_bias, dtype=dtype,
                  bias_init=nn.initializers.normal(1.0))
    ours, ref = layers.Dense(**kwargs), nn.Dense(**kwargs)
    params = ours.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(params) == jax.tree.structure(ref.init(jax.random.PRNGKey(0), x))
    out, want = ours.apply(params, x), ref.apply(params, x)
    assert out.dtype == want.dtype and out.shape == want.shape
    assert rel_err(out.astype(jnp.float32), want.astype(jnp.float32)) < 1e-6
    grad = lambda m: jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))),  # noqa: E731
                              argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(ref))):
        assert rel_err(a.astype(jnp.float32), b.astype(jnp.float32)) < 1e-6


def test_modulated_layer_norm_backward_equals_autodiff():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 5, 16)) * 3 + 1, jnp.float32)
    shift, scale = (jnp.asarray(rng.standard_normal((2, 16)), jnp.float32) for _ in range(2))
    probe = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    plain = lambda x, a, b: layers.modulate(layers.layer_norm(x), a, b)  # noqa: E731
    fused = layers.modulated_layer_norm
    assert rel_err(fused(x, shift, scale), plain(x, shift, scale)) < 1e-6
    g_fused = jax.grad(lambda *a: jnp.sum(jnp.tanh(fused(*a)) * probe), argnums=(0, 1, 2))
    g_plain = jax.grad(lambda *a: jnp.sum(jnp.tanh(plain(*a)) * probe), argnums=(0, 1, 2))
    for a, b in zip(g_fused(x, shift, scale), g_plain(x, shift, scale)):
        assert rel_err(a, b) < 1e-5


def test_gelu_tanh_backward_equals_the_closed_form_and_autodiff():
    x64 = np.concatenate([np.linspace(-12, 12, 2001), [0.0, -1e-4, 1e-4]])

    def gelu64(v):  # the tanh form of timm's / torch's GELU(approximate="tanh"), in float64
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))

    h = 1e-5
    slope64 = (gelu64(x64 + h) - gelu64(x64 - h)) / (2 * h)
    x = jnp.asarray(x64, jnp.float32)
    assert np.abs(np.asarray(layers.gelu_tanh(x)) - gelu64(x64)).max() < 1e-5
    got = np.asarray(jax.jit(jax.grad(lambda v: jnp.sum(layers.gelu_tanh(v))))(x))
    assert np.abs(got - slope64).max() < 1e-5
    autodiff = jax.grad(lambda v: jnp.sum(nn.gelu(v, approximate=True)))(x)
    assert np.abs(got - np.asarray(autodiff)).max() < 5e-6
    half = jax.grad(lambda v: jnp.sum(layers.gelu_tanh(v).astype(jnp.float32)))(
        x.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16 and np.abs(np.asarray(half, np.float32) - slope64).max() < 0.02


def test_materialize_is_the_identity_in_value_and_gradient():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 8)), jnp.float32)
    f = jax.jit(lambda v: jnp.sum(jnp.sin(layers.materialize(v * 2.0))))
    np.testing.assert_array_equal(jax.grad(f)(x), 2.0 * jnp.cos(2.0 * x))
    nan_first = x.at[0, 0, 0].set(jnp.nan)  # the predicate's other branch is the identity too
    np.testing.assert_array_equal(jax.jit(layers.materialize)(nan_first), nan_first)
    text = jax.jit(layers.materialize).lower(x).as_text()
    assert ("conditional" in text or "case" in text) == (jax.default_backend() == "cpu")


@pytest.mark.parametrize("integration,onednn", [("mask_skip_init", False), ("mask", False),
                                                ("mask_skip_init", True)])
def test_switch_mask_equals_the_per_expert_sum_of_eq6(integration, onednn, monkeypatch):
    # onednn: the experts' gradient as sums over samples (switch._sum_over_samples), as on
    # one CPU device with oneDNN matmuls
    monkeypatch.setattr(switch, "_samples_one_by_one", lambda batch: onednn)
    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    t_all = jnp.asarray(rng.standard_normal((10, 16)), jnp.float32)
    t = jnp.array([0, 4, 9])
    router = SwitchRouter(num_experts=3, top_k=2, integration=integration)
    params = nn.unbox(router.init(jax.random.PRNGKey(0), z, t_all, t, False)["params"])
    params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.3, p.dtype),
                          params)

    def per_expert(p, z):
        probs = jax.nn.softmax(jax.nn.silu(t_all) @ p["gate"]["kernel"] + p["gate"]["bias"])[t]
        keep = probs >= jnp.sort(probs, axis=-1)[:, -2:-1]  # the top 2 of 3, raw gates
        out = sum(jnp.where(keep[:, j, None, None], probs[:, j, None, None], 0.0)
                  * (z @ p["experts_kernel"][j] + p["experts_bias"][j]) for j in range(3))
        return 1.0 + out if integration.endswith("_init") else out

    ours = lambda p, z: router.apply({"params": p}, z, t_all, t, False)  # noqa: E731
    assert rel_err(ours(params, z), per_expert(params, z)) < 1e-5
    probe = jnp.asarray(rng.standard_normal(z.shape), jnp.float32)
    for a, b in zip(jax.grad(lambda p, z: jnp.sum(ours(p, z) * probe), argnums=(0, 1))(params, z),
                    jax.grad(lambda p, z: jnp.sum(per_expert(p, z) * probe),
                             argnums=(0, 1))(params, z)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            assert rel_err(x, y) < 1e-5


class FakeDevice:
    def __init__(self, platform, kind="", capability=""):
        self.platform, self.device_kind, self.compute_capability = platform, kind, capability


@pytest.mark.parametrize("platform,dtype,head_dim,kind,cap,want", [
    ("gpu", jnp.bfloat16, 64, "NVIDIA H100 80GB HBM3", "9.0", "cudnn"),   # DiT-S/B/L/XL: 64
    ("gpu", jnp.float16, 72, "NVIDIA A100-SXM4-80GB", "8.0", "cudnn"),   # DiT-XL/2: 1152/16
    ("gpu", jnp.bfloat16, 192, "NVIDIA H200", "9.0", "cudnn"),           # <= 256 on Hopper
    ("gpu", jnp.bfloat16, 192, "NVIDIA A100-SXM4-80GB", "8.0", "xla"),   # > 128 elsewhere
    ("gpu", jnp.bfloat16, 12, "NVIDIA H100", "9.0", "xla"),              # not a multiple of 8
    ("gpu", jnp.float32, 64, "NVIDIA H100", "9.0", "xla"),               # cuDNN flash is 16-bit
    ("cpu", jnp.bfloat16, 64, "cpu", "", "xla"),
    ("tpu", jnp.bfloat16, 64, "TPU v5 lite", "", "xla"),
])
def test_auto_attention_selection(platform, dtype, head_dim, kind, cap, want):
    device = FakeDevice(platform, kind, cap)
    assert attention.choose_implementation("auto", dtype, head_dim, device=device) == want
    for explicit in ("xla", "cudnn"):
        assert attention.choose_implementation(explicit, dtype, head_dim, device=device) == explicit


def test_auto_is_logged_once_and_agrees_with_xla_on_cpu(caplog):
    attention._log_choice.cache_clear()
    with caplog.at_level(logging.INFO, logger="switch_dit_jax"):
        auto = build_model(dict(TINY, attention_impl="auto"))
        build_model(dict(TINY, attention_impl="auto"))
    assert sum("attention_impl='auto' chose 'xla'" in r.message for r in caplog.records) == 1
    xla = build_model(dict(TINY, attention_impl="xla"))
    assert auto.attention_impl == "xla"
    shapes = reference_dit.official_shapes(3, 64, 3, 2, 10, True, 8)
    params = convert.from_torch_state_dict(reference_dit.random_state_dict(shapes, seed=6), TINY)
    x = np.random.default_rng(5).standard_normal((2, 8, 8, 3)).astype(np.float32)
    args = (x, np.array([1, 500]), np.array([3, 4]))
    np.testing.assert_array_equal(auto.apply({"params": params}, *args),
                                  xla.apply({"params": params}, *args))
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        build_model(dict(TINY, attention_impl="flash"))


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_policies_leave_the_gradients_unchanged(policy):
    shapes = reference_dit.official_shapes(3, 64, 3, 2, 10, True, 8)
    params = convert.from_torch_state_dict(reference_dit.random_state_dict(shapes, seed=7), TINY)
    x = np.random.default_rng(6).standard_normal((2, 8, 8, 3)).astype(np.float32)
    args = (x, np.array([1, 500]), np.array([3, 4]))

    def grads(model):
        return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, *args) ** 2)))(params)

    plain, remat = grads(build_model(TINY)), grads(build_model(TINY, remat_policy=policy))
    for a, b in zip(jax.tree.leaves(remat), jax.tree.leaves(plain)):
        assert rel_err(a, b) < 1e-5
    with pytest.raises(ValueError, match="remat_policy='everything'"):
        build_model(TINY, remat_policy="everything")


@pytest.mark.parametrize("text,span", [("", None), ("7", (7, 7)), ("20-25", (20, 25)),
                                       (" 3-3 ", (3, 3))])
def test_profile_steps_parse(text, span):
    from switch_dit_jax.train.runtime import parse_profile_steps
    assert parse_profile_steps(text) == span


@pytest.mark.parametrize("text", ["0", "5-2", "a-b", "3-", "1,2"])
def test_bad_profile_steps_are_one_sentence(text):
    from switch_dit_jax.config_base import load_config
    from switch_dit_jax.validation import ConfigError, validate_config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(root, "configs", "quickstart.py"),
                         {"train.profile_steps": text})
    with pytest.raises(ConfigError, match="train.profile_steps"):
        validate_config(config, 1)
