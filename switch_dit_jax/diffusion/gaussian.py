"""DDPM / improved-DDPM Gaussian diffusion in JAX, with the maths of ADM and DiT.

Schedules and coefficients are derived in float64 NumPy (small errors in alpha_bar near
1 matter for the posterior at small t) and gathered as float32 inside jitted code.
Arrays carry the batch on axis 0 and channels on the last axis (NHWC); the raw model
output holds eps in its first C channels and, with ``learn_sigma``, the variance
interpolation values in the last C.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from switch_dit_jax.diffusion.respace import respace_betas, space_timesteps

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
SCHEDULES = ("linear", "cosine")


def get_beta_schedule(schedule: str, num_timesteps: int) -> np.ndarray:
    """float64 betas of the named schedule ("linear": DDPM, "cosine": IDDPM)."""
    if schedule == "linear":
        # Rescaled so that any T spans the same total noise as DDPM's T=1000 schedule.
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if schedule == "cosine":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        # The cap stops the singularity of beta at t -> T.
        return np.array([min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps),
                             0.999) for i in range(num_timesteps)], dtype=np.float64)
    raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {SCHEDULES}")


def mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """tanh approximation of Phi(x), kept (over erf) so likelihoods match ADM's numbers."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-probability (nats) of 8-bit data rescaled to [-1, 1] under a Gaussian whose
    mass is integrated over each pixel's bin of width 2/255; the outermost bins extend
    to +-infinity so the 256 bins sum to one."""
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    # Clamping (rather than masking afterwards) keeps log() and its gradient finite in
    # the branches that jnp.where discards.
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


_COEFFICIENTS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "log_betas", "fixed_large_variance", "fixed_large_log_variance")


class GaussianDiffusion:
    """ADM-style Gaussian diffusion (eps prediction; learned-range or fixed-large variance).

    ``t`` arguments of all methods index THIS (possibly respaced) process; the model is
    always called with the original timesteps ``timestep_map[t]``.
    """

    def __init__(self, schedule: str = "linear", num_timesteps: int = 1000,
                 learn_sigma: bool = True, timestep_respacing: str = ""):
        if int(num_timesteps) < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        self.schedule = schedule
        self.learn_sigma = bool(learn_sigma)
        self.timestep_respacing = timestep_respacing
        self.original_num_timesteps = int(num_timesteps)
        base = get_beta_schedule(schedule, self.original_num_timesteps)
        kept = space_timesteps(self.original_num_timesteps, timestep_respacing)
        if len(kept) < 2:
            raise ValueError(f"timestep_respacing {timestep_respacing!r} keeps {len(kept)} "
                             "step(s); at least 2 are needed")
        betas, self.timestep_map = respace_betas(base, kept)
        self.num_timesteps = len(betas)

        b = betas
        self.betas = b
        acp = np.cumprod(1.0 - b)
        self.alphas_cumprod = acp
        self.alphas_cumprod_prev = np.append(1.0, acp[:-1])
        self.alphas_cumprod_next = np.append(acp[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1.0)
        pv = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - acp)
        self.posterior_variance = pv
        # pv[0] == 0 has no log; ADM substitutes pv[1], so the t == 0 decoder (and the
        # lower end of the learned range there) gets a small but finite variance.
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(self.alphas_cumprod_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - b) / (1.0 - acp)
        self.log_betas = np.log(b)
        # FIXED_LARGE uses beta_t, except at t == 0 where the (larger-than-zero) posterior
        # variance of step 1 gives a sensible decoder.
        self.fixed_large_variance = np.append(pv[1], b[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

        self._f32 = {k: jnp.asarray(getattr(self, k), jnp.float32) for k in _COEFFICIENTS}
        self._tmap = jnp.asarray(self.timestep_map, jnp.int32)

    # ------------------------------------------------------------------ helpers
    def _gather(self, name: str, t, x_shape) -> jax.Array:
        """Per-sample coefficient ``name[t]`` shaped to broadcast against x ([B,1,...,1])."""
        vals = self._f32[name][jnp.asarray(t)]
        return vals.reshape((vals.shape[0],) + (1,) * (len(x_shape) - 1))

    def model_timesteps(self, t) -> jax.Array:
        """Original-process timesteps for the model, from indices of this process."""
        return self._tmap[jnp.asarray(t)]

    def _check_output(self, model_output, x) -> None:
        c = x.shape[-1]
        want = 2 * c if self.learn_sigma else c
        if model_output.shape[:-1] != x.shape[:-1] or model_output.shape[-1] != want:
            raise ValueError(
                f"model output shape {tuple(model_output.shape)} does not match x shape "
                f"{tuple(x.shape)}: expected {want} channels on the last axis "
                f"({'eps + variance values, learn_sigma=True' if self.learn_sigma else 'eps only, learn_sigma=False'})")

    # ------------------------------------------------------------------ q / posterior
    def q_mean_variance(self, x_start, t):
        s = x_start.shape
        mean = self._gather("sqrt_alphas_cumprod", t, s) * x_start
        var = jnp.broadcast_to(1.0 - self._gather("alphas_cumprod", t, s), s)
        log_var = jnp.broadcast_to(self._gather("log_one_minus_alphas_cumprod", t, s), s)
        return mean, var, log_var

    def q_sample(self, x_start, t, noise):
        s = x_start.shape
        return (self._gather("sqrt_alphas_cumprod", t, s) * x_start
                + self._gather("sqrt_one_minus_alphas_cumprod", t, s) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        s = x_t.shape
        mean = (self._gather("posterior_mean_coef1", t, s) * x_start
                + self._gather("posterior_mean_coef2", t, s) * x_t)
        var = jnp.broadcast_to(self._gather("posterior_variance", t, s), s)
        log_var = jnp.broadcast_to(self._gather("posterior_log_variance_clipped", t, s), s)
        return mean, var, log_var

    def predict_xstart_from_eps(self, x_t, t, eps):
        s = x_t.shape
        return (self._gather("sqrt_recip_alphas_cumprod", t, s) * x_t
                - self._gather("sqrt_recipm1_alphas_cumprod", t, s) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        s = x_t.shape
        return ((self._gather("sqrt_recip_alphas_cumprod", t, s) * x_t - pred_xstart)
                / self._gather("sqrt_recipm1_alphas_cumprod", t, s))

    # ------------------------------------------------------------------ p
    def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = True) -> dict:
        """p(x_{t-1} | x_t) from the raw model output: dict with mean, variance,
        log_variance, pred_xstart and eps."""
        self._check_output(model_output, x_t)
        s, c = x_t.shape, x_t.shape[-1]
        eps = model_output[..., :c]
        if self.learn_sigma:
            # LEARNED_RANGE: interpolate in log space between the posterior variance
            # (lower bound) and beta_t (upper bound), as IDDPM.
            frac = (model_output[..., c:] + 1.0) / 2.0
            log_var = (frac * self._gather("log_betas", t, s)
                       + (1.0 - frac) * self._gather("posterior_log_variance_clipped", t, s))
            var = jnp.exp(log_var)
        else:
            var = jnp.broadcast_to(self._gather("fixed_large_variance", t, s), s)
            log_var = jnp.broadcast_to(self._gather("fixed_large_log_variance", t, s), s)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": var, "log_variance": log_var,
                "pred_xstart": pred_xstart, "eps": eps}

    def vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised: bool = False):
        """Per-sample variational-bound term in bits/dim: KL(q || p) for t > 0, the
        discretized decoder NLL of x_start at t == 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, out["mean"], 0.5 * out["log_variance"]))
        return jnp.where(jnp.asarray(t) == 0, nll, kl) / math.log(2.0)

    def training_losses(self, model_fn: ModelFn, x_start, t, noise) -> dict:
        """{"loss", "mse", "vb"}, each [B]. ``loss = mse + vb`` (DiT's LossType.MSE)."""
        x_t = self.q_sample(x_start, t, noise)
        out = model_fn(x_t, self.model_timesteps(t))
        self._check_output(out, x_t)
        eps = out[..., :x_t.shape[-1]]
        mse = mean_flat((noise - eps) ** 2)
        if self.learn_sigma:
            # The bound only trains the variance; the eps head is trained by the MSE alone.
            frozen = jnp.concatenate([jax.lax.stop_gradient(eps), out[..., x_t.shape[-1]:]], -1)
            vb = self.vb_terms_bpd(frozen, x_start, x_t, t, clip_denoised=False)
        else:
            vb = jnp.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ------------------------------------------------------------------ sampling
    def _step_t(self, x, i):
        return jnp.full((x.shape[0],), i, dtype=jnp.int32)

    def p_sample(self, model_fn: ModelFn, x, i, key, clip_denoised: bool = True):
        """One ancestral step from step index ``i`` (a scalar, shared by the batch)."""
        t = self._step_t(x, i)
        out = self.p_mean_variance(model_fn(x, self.model_timesteps(t)), x, t, clip_denoised)
        noise = jax.random.normal(key, x.shape, x.dtype)
        add_noise = (jnp.asarray(i) != 0).astype(x.dtype)  # the last step returns the mean
        return out["mean"] + add_noise * jnp.exp(0.5 * out["log_variance"]) * noise

    def ddim_sample(self, model_fn: ModelFn, x, i, key, eta: float = 0.0,
                    clip_denoised: bool = True):
        """One DDIM step; eps is re-derived from the (possibly clipped) x0 prediction."""
        t = self._step_t(x, i)
        out = self.p_mean_variance(model_fn(x, self.model_timesteps(t)), x, t, clip_denoised)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self._gather("alphas_cumprod", t, x.shape)
        abar_prev = self._gather("alphas_cumprod_prev", t, x.shape)
        sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
        mean = (out["pred_xstart"] * jnp.sqrt(abar_prev)
                + jnp.sqrt(1.0 - abar_prev - sigma ** 2) * eps)
        noise = jax.random.normal(key, x.shape, x.dtype)
        add_noise = (jnp.asarray(i) != 0).astype(x.dtype)
        return mean + add_noise * sigma * noise

    def _loop(self, step, shape, key, noise, progress: bool, desc: str):
        # One key for x_T, one per step indexed by loop position: the scan and the host
        # loop consume identical randomness.
        key_init, key_steps = jax.random.split(key)
        if noise is None:
            x = jax.random.normal(key_init, tuple(shape), jnp.float32)
        else:
            x = jnp.asarray(noise)
            if x.shape != tuple(shape):
                raise ValueError(f"noise shape {x.shape} != requested shape {tuple(shape)}")
        steps = np.arange(self.num_timesteps - 1, -1, -1, dtype=np.int32)
        keys = jax.random.split(key_steps, self.num_timesteps)
        if not progress:
            def body(x, inp):
                return step(x, inp[0], inp[1]), None
            x, _ = jax.lax.scan(body, x, (jnp.asarray(steps), keys))
            return x
        jstep = jax.jit(step)
        for n in _progress(len(steps), desc):
            x = jstep(x, steps[n], keys[n])
        return x

    def p_sample_loop(self, model_fn: ModelFn, shape, key, clip_denoised: bool = True,
                      progress: bool = False, noise=None):
        """Ancestral sampling from x_T ~ N(0, I) (or ``noise``) over every step."""
        def step(x, i, k):
            return self.p_sample(model_fn, x, i, k, clip_denoised)
        return self._loop(step, shape, key, noise, progress, "p_sample")

    def ddim_sample_loop(self, model_fn: ModelFn, shape, key, eta: float = 0.0,
                         clip_denoised: bool = True, progress: bool = False, noise=None):
        """DDIM sampling over every step of this process (respace with "ddimN" / "N")."""
        def step(x, i, k):
            return self.ddim_sample(model_fn, x, i, k, eta, clip_denoised)
        return self._loop(step, shape, key, noise, progress, "ddim_sample")


def _progress(n: int, desc: str):
    try:
        from tqdm.auto import tqdm
        return tqdm(range(n), desc=desc)
    except ImportError:
        return _print_progress(n, desc)


def _print_progress(n: int, desc: str):
    every = max(1, -(-n // 10))
    for k in range(n):
        yield k
        if (k + 1) % every == 0 or k + 1 == n:
            print(f"{desc}: {k + 1}/{n}", flush=True)
