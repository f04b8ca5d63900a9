"""Tests of switch_dit_jax.diffusion.flow against closed-form references.

References never call the module under test: the loss is written out in float64 NumPy,
the samplers are checked on linear ODEs with known solutions and on the exact
rectified-flow velocity of Gaussian data, whose flow map is affine in closed form.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switch_dit_jax.diffusion.flow import RectifiedFlow

FLOW = RectifiedFlow()


# ----------------------------------------------------------------------------- training
def fake_model(x, t, channels=None):
    """A velocity 'model' that depends on both x and t, optionally with 2C channels."""
    v = 0.5 * x + jnp.sin(3.0 * t)[:, None, None, None] - 0.1 * x ** 2
    return v if channels is None else jnp.concatenate([v, 7.0 + 0 * v], -1)


def ref_loss(data, noise, t):
    data, noise, t = (np.asarray(a, np.float64) for a in (data, noise, t))
    tt = t[:, None, None, None]
    x_t = tt * data + (1 - tt) * noise
    v = 0.5 * x_t + np.sin(3.0 * tt) - 0.1 * x_t ** 2
    return ((v - (data - noise)) ** 2).mean(axis=(1, 2, 3))


def _batch(seed=0, shape=(5, 4, 4, 3)):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(k1, shape), jax.random.normal(k2, shape),
            FLOW.sample_t(k3, shape[0]))


@pytest.mark.parametrize("two_c", [False, True])
def test_loss_matches_formula_per_sample_and_under_jit(two_c):
    data, noise, t = _batch()
    fn = (lambda x, t: fake_model(x, t, channels=2)) if two_c else fake_model
    out = FLOW.training_losses(fn, data, t, noise)
    want = ref_loss(data, noise, t)
    assert set(out) == {"loss", "mse", "vb"}
    np.testing.assert_allclose(out["mse"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["loss"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["vb"], np.zeros(5))
    jitted = jax.jit(lambda d, t, n: FLOW.training_losses(fn, d, t, n))(data, t, noise)
    np.testing.assert_allclose(jitted["loss"], want, rtol=1e-5, atol=1e-6)


def test_interpolate_endpoints_and_sample_t():
    data, noise, _ = _batch(1)
    np.testing.assert_array_equal(FLOW.interpolate(data, noise, jnp.zeros(5)), noise)
    np.testing.assert_array_equal(FLOW.interpolate(data, noise, jnp.ones(5)), data)
    mid = FLOW.interpolate(data, noise, jnp.full((5,), 0.25))
    np.testing.assert_allclose(mid, 0.25 * data + 0.75 * noise, rtol=1e-6, atol=1e-6)
    t = FLOW.sample_t(jax.random.PRNGKey(0), 4096)
    assert t.shape == (4096,) and t.dtype == jnp.float32
    assert float(t.min()) >= 0.0 and float(t.max()) < 1.0 and abs(float(t.mean()) - 0.5) < 0.02
    t = RectifiedFlow(t_eps=0.1).sample_t(jax.random.PRNGKey(0), 4096)
    assert float(t.min()) >= 0.1 and float(t.max()) < 0.9


# ----------------------------------------------------------------------------- samplers
A = jnp.array([-1.5, -0.5, 0.3, 1.0])   # diagonal rates, per channel
B = jnp.array([0.7, -0.4, 1.2, 0.0])    # time-dependent forcing


def linear_velocity(x, t):
    """v = a·x + b·t: the forcing makes the test sensitive to how t runs (0 -> 1)."""
    return A * x + B * t[:, None]


def linear_solution(x0):
    """x(1) = e^a x0 + b (e^a - 1 - a) / a²  (the b term tends to b/2 as a -> 0)."""
    a, b = np.asarray(A, np.float64), np.asarray(B, np.float64)
    return np.exp(a) * np.asarray(x0, np.float64) + b * (np.exp(a) - 1 - a) / a ** 2


X0 = jax.random.normal(jax.random.PRNGKey(3), (6, 4))


def _err(method, n):
    x = FLOW.sample(linear_velocity, X0.shape, None, method=method, num_steps=n, noise=X0)
    return float(np.max(np.abs(np.asarray(x, np.float64) - linear_solution(X0))))


def test_linear_ode_euler_dopri5_and_heun_orders():
    ref = linear_solution(X0)
    scale = float(np.max(np.abs(ref)))
    x_eu = FLOW.sample(linear_velocity, X0.shape, None, method="euler", num_steps=2000,
                       noise=X0)
    # O(1/n): the leading term max(a²)/2n is ~6e-4 relative at n = 2000.
    assert float(np.max(np.abs(np.asarray(x_eu) - ref))) < 2e-3 * scale
    x_dp, nfe = FLOW.sample(linear_velocity, X0.shape, None, method="dopri5", noise=X0,
                            return_nfe=True)
    e_dp = float(np.max(np.abs(np.asarray(x_dp) - ref)))
    assert e_dp < 10 * 1e-3 * scale and 8 <= nfe < 200 and (nfe - 2) % 6 == 0
    np.testing.assert_allclose(x_eu, x_dp, atol=3e-3 * scale)
    # Orders: halving the step divides Euler's error by ~2 and Heun's by ~4.
    e20, e40 = _err("euler", 20), _err("euler", 40)
    h20, h40 = _err("heun", 20), _err("heun", 40)
    assert 1.7 < e20 / e40 < 2.3 and 3.4 < h20 / h40 < 4.6
    assert h20 < e20 / 20
    # Tighter tolerances: more evaluations, smaller error.
    x_tight, nfe_tight = FLOW.sample(linear_velocity, X0.shape, None, method="dopri5",
                                     noise=X0, rtol=1e-6, atol=1e-7, return_nfe=True)
    assert nfe_tight > nfe and float(np.max(np.abs(np.asarray(x_tight) - ref))) < 1e-4 * scale


def test_sampling_is_jittable_and_progress_loop_agrees(capsys):
    for method in ("euler", "heun", "dopri5"):
        run = jax.jit(lambda x0, m=method: FLOW.sample(linear_velocity, X0.shape, None,
                                                       method=m, num_steps=16, noise=x0,
                                                       return_nfe=True))
        x_jit, nfe_jit = run(X0)
        x_host, nfe_host = FLOW.sample(linear_velocity, X0.shape, None, method=method,
                                       num_steps=16, noise=X0, progress=True, return_nfe=True)
        np.testing.assert_allclose(x_jit, x_host, rtol=1e-5, atol=1e-6)
        assert int(nfe_jit) == nfe_host == {"euler": 16, "heun": 32}.get(method, nfe_host)
    assert "dopri5: t=1.000" in capsys.readouterr().out


def test_time_grid_matches_official_samplers():
    # Euler evaluates at i/N (t = 0 included, t = 1 never); the official Heun corrects
    # every step, so its last correction evaluates the model at t = 1.
    nan_at = lambda t0: (lambda x, t: jnp.where(t[:, None] == t0, jnp.nan, 1.0) * x)  # noqa: E731
    x0 = jnp.ones((2, 3))
    FLOW.sample(nan_at(1.0), x0.shape, None, method="euler", num_steps=4, noise=x0)
    with pytest.raises(FloatingPointError):
        FLOW.sample(nan_at(0.0), x0.shape, None, method="euler", num_steps=4, noise=x0)
    with pytest.raises(FloatingPointError):
        FLOW.sample(nan_at(1.0), x0.shape, None, method="heun", num_steps=4, noise=x0)


def test_noise_drawn_from_key():
    x = FLOW.sample(lambda x, t: jnp.zeros_like(x), (3, 2), jax.random.PRNGKey(5), num_steps=2)
    np.testing.assert_array_equal(x, jax.random.normal(jax.random.PRNGKey(5), (3, 2)))


MU, S = 1.5, 0.4


def gaussian_optimal_velocity(x, t):
    """v*(x, t) = E[d - n | x_t = x] for d ~ N(mu, s²), n ~ N(0, 1), x_t = t d + (1-t) n:
    jointly Gaussian, so E[u | x] = E u + Cov(u, x_t) / Var(x_t) · (x - E x_t) with
    E u = mu, E x_t = t mu, Cov = t s² - (1-t), Var = t² s² + (1-t)²."""
    t = t[:, None]
    return MU + (t * S ** 2 - (1 - t)) / (t ** 2 * S ** 2 + (1 - t) ** 2) * (x - t * MU)


def test_exact_gaussian_velocity_transports_noise_to_data():
    # x(t) = t mu + sqrt(t² s² + (1-t)²) z solves the ODE, so x(1) = mu + s·x(0) per sample.
    z = jax.random.normal(jax.random.PRNGKey(7), (4000, 1))
    x1, nfe = FLOW.sample(gaussian_optimal_velocity, z.shape, None, method="dopri5",
                          noise=z, return_nfe=True)
    x1 = np.asarray(x1, np.float64)
    np.testing.assert_allclose(x1, MU + S * np.asarray(z), atol=1e-2)  # ~10·rtol·|x|
    # Against the target law (not the pushed-forward z): 4000 samples, mean SE s/63.
    assert abs(x1.mean() - MU) < 4 * S / np.sqrt(4000)
    assert abs(x1.std() - S) < 4 * S / np.sqrt(2 * 4000)
    heun = np.asarray(FLOW.sample(gaussian_optimal_velocity, z.shape, None, method="heun",
                                  num_steps=50, noise=z))
    np.testing.assert_allclose(heun, MU + S * np.asarray(z), atol=2e-3)


# ----------------------------------------------------------------------------- errors
def test_clear_errors():
    with pytest.raises(ValueError, match="'rk4'"):
        FLOW.sample(linear_velocity, X0.shape, None, method="rk4", noise=X0)
    with pytest.raises(ValueError, match="num_steps=0"):
        FLOW.sample(linear_velocity, X0.shape, None, num_steps=0, noise=X0)
    with pytest.raises(ValueError, match="t_eps=0.7"):
        RectifiedFlow(t_eps=0.7)
    with pytest.raises(ValueError, match="noise shape"):
        FLOW.sample(linear_velocity, (2, 4), None, noise=X0)
    data, noise, t = _batch()
    with pytest.raises(ValueError, match="integer DDPM timesteps"):
        FLOW.training_losses(fake_model, data, jnp.arange(5), noise)
    with pytest.raises(ValueError, match="must return 3 channels"):
        FLOW.training_losses(lambda x, t: x[..., :2], data, t, noise)
    nan_after_half = lambda x, t: jnp.where(t[:, None] > 0.5, jnp.nan, 1.0) * x  # noqa: E731
    for method in ("euler", "heun", "dopri5"):
        with pytest.raises(FloatingPointError, match=f"{method} sampling produced non-finite"):
            FLOW.sample(nan_after_half, X0.shape, None, method=method, num_steps=4, noise=X0)
    stiff = lambda x, t: -2000.0 * x  # noqa: E731
    with pytest.raises(RuntimeError, match="max_steps=20"):
        FLOW.sample(stiff, X0.shape, None, method="dopri5", noise=X0, max_steps=20)
    # Under jit the failure cannot raise; it surfaces as NaN output.
    out = jax.jit(lambda x0: FLOW.sample(stiff, X0.shape, None, method="dopri5", noise=x0,
                                         max_steps=20))(X0)
    assert np.all(np.isnan(out))
