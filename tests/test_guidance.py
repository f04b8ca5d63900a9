"""Classifier-free guidance (diffusion/guidance.py): the formula, the channels it guides, and
DiffMoE's two pools."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switch_dit_jax.config_base import get_base_config
from switch_dit_jax.diffusion.guidance import guided_fn
from switch_dit_jax.models import build_model

NULL = 10


def toy_apply(calls):
    """A 2C-output model (eps | variance) whose output depends on the class."""
    def apply(x, t, y):
        calls.append(x.shape[0])
        yy = y[:, None, None, None].astype(jnp.float32)
        tt = t[:, None, None, None].astype(jnp.float32)
        return jnp.concatenate([x * (1 + yy) + 0.01 * tt, x * yy - tt], -1)
    return apply


@pytest.mark.parametrize("pool", ["separate", "joint"])
@pytest.mark.parametrize("channels", [None, 3])
def test_guidance_formula_channels_and_calls(pool, channels):
    calls = []
    apply = toy_apply(calls)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 4))
    t, y = jnp.array([1, 5, 9, 999]), jnp.array([0, 3, 7, 2])
    cond = np.asarray(apply(x, t, y))
    unc = np.asarray(apply(x, t, jnp.full((4,), NULL)))
    calls.clear()
    s = 4.0
    got = np.asarray(guided_fn(apply, y, NULL, s, guided_channels=channels, pool=pool)(x, t))
    assert calls == ([8] if pool == "joint" else [4, 4])
    k = 4 if channels is None else channels
    want = cond.copy()  # unguided channels (the 4th eps channel with k = 3, the variance)
    want[..., :k] = unc[..., :k] + s * (cond[..., :k] - unc[..., :k])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # facebookresearch/DiT's 3 channels: the 4th eps channel stays the conditional one
    assert np.allclose(got[..., 3], cond[..., 3]) == (channels == 3)
    one = np.asarray(guided_fn(apply, y, NULL, 1.0, pool=pool)(x, t))
    np.testing.assert_allclose(one, cond, rtol=1e-6, atol=1e-6)
    velocity = guided_fn(apply, y, NULL, s, guided_channels=channels, pool=pool,
                         out_channels=4)(x, t)
    np.testing.assert_allclose(velocity, want[..., :4], rtol=1e-5, atol=1e-5)


def test_diffmoe_separate_pools_equal_two_independent_calls():
    model = build_model({"name": "custom", "depth": 2, "hidden_size": 32, "num_heads": 2,
                         "patch_size": 2, "input_size": 8, "in_channels": 4,
                         "num_classes": 10, "learn_sigma": False,
                         "ffn": {"kind": "diffmoe", "num_experts": 4}})
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((6, 8, 8, 4)), jnp.float32)
    t, y = jnp.full((6,), 0.4), jnp.asarray([0, 1, 2, 3, 4, 5])
    variables = nn.unbox(model.init(jax.random.PRNGKey(0), x, t, y))
    variables.pop("aux", None)
    # Non-zero outputs, and thresholds mid-range so that the pool decides what each expert takes.
    variables["params"] = jax.tree.map(
        lambda p: p + 0.05 * jnp.asarray(rng.standard_normal(p.shape), p.dtype),
        variables["params"])
    variables["moe_state"] = jax.tree.map(lambda v: jnp.full_like(v, 0.5), variables["moe_state"])
    apply = jax.jit(lambda x, t, y: model.apply(variables, x, t, y))
    s = 1.5
    cond, unc = apply(x, t, y), apply(x, t, jnp.full((6,), 10))
    want = unc + s * (cond - unc)
    separate = guided_fn(apply, y, 10, s, pool="separate", out_channels=4)(x, t)
    np.testing.assert_allclose(separate, want, rtol=1e-5, atol=1e-6)
    joint = guided_fn(apply, y, 10, s, pool="joint", out_channels=4)(x, t)
    # One doubled pool lets conditional and unconditional tokens compete for the experts.
    assert np.abs(np.asarray(joint) - np.asarray(want)).max() > 1e-4


def test_defaults_and_bad_values():
    c = get_base_config()
    assert c.sample.cfg_pool == "separate" and c.sample.cfg_channels == 0
    with pytest.raises(ValueError, match="sample.cfg_pool='both'"):
        guided_fn(lambda *a: a[0], jnp.zeros(2, jnp.int32), 1, 2.0, pool="both")
