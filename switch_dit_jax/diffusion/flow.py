"""Rectified flow (flow matching on straight paths) with the conventions of DiffMoE's code.

Conventions (KwaiVGI/DiffMoE ``diffusion/rectified_flow.py``; the paper's appendix writes
the mirror image, x_t = (1-t)·x0 + t·eps, which the code does not use):

* ``x_t = t·data + (1-t)·noise``, so t = 0 is pure noise and t = 1 is data; the regression
  target is the constant path velocity ``data - noise``; t ~ U[0, 1) (``torch.rand``, no
  epsilon: the velocity target has no singularity at either end). The raw t in [0, 1] is
  the model's timestep input (not t·1000).
* A model output with 2C channels (a DiT built with learn_sigma) is used through its first
  C channels, as the official code's ``chunk(2)``; DiffMoE trains without learned sigma, so
  there is no variance term and ``vb`` is zero.
* Sampling integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1. Euler evaluates at
  t_i = i/N (never at t = 1). Heun corrects *every* step, including the last one that
  evaluates the model at t = 1 (the official ``heun_step``; 2N evaluations, matching the
  paper's "Heun, NFE 250" at 125 steps), unlike EDM-style Heun which ends with an Euler step.
* dopri5 follows torchdiffeq's (the official code's solver): Dormand-Prince 5(4) with
  local extrapolation and FSAL, RMS error norm over the whole batch (one shared step
  size), Hairer's initial step, and an integral controller ``dt·clip(0.9·err^(-1/5),
  0.2, 10)`` that never shrinks an accepted step. Unlike torchdiffeq, which overshoots
  t = 1 and interpolates, the last step is clipped to land on t = 1, so the model is never
  evaluated outside [0, 1].
"""
from __future__ import annotations

import fractions
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from switch_dit_jax.diffusion.gaussian import _progress, mean_flat

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]
METHODS = ("euler", "heun", "dopri5")

# Dormand-Prince 5(4) tableau as exact fractions, so the error weights b5 - b4 carry no
# rounding of their own before the single conversion to float.
_F = fractions.Fraction
_C = [_F(0), _F(1, 5), _F(3, 10), _F(4, 5), _F(8, 9), _F(1), _F(1)]
_A = [[],
      [_F(1, 5)],
      [_F(3, 40), _F(9, 40)],
      [_F(44, 45), _F(-56, 15), _F(32, 9)],
      [_F(19372, 6561), _F(-25360, 2187), _F(64448, 6561), _F(-212, 729)],
      [_F(9017, 3168), _F(-355, 33), _F(46732, 5247), _F(49, 176), _F(-5103, 18656)],
      [_F(35, 384), _F(0), _F(500, 1113), _F(125, 192), _F(-2187, 6784), _F(11, 84)]]
_B5 = _A[6] + [_F(0)]
_B4 = [_F(5179, 57600), _F(0), _F(7571, 16695), _F(393, 640), _F(-92097, 339200),
       _F(187, 2100), _F(1, 40)]
_A_MAT = np.array([row + [_F(0)] * (7 - len(row)) for row in _A], np.float64)
_C_VEC = np.array(_C, np.float64)
_E_VEC = np.array([b5 - b4 for b5, b4 in zip(_B5, _B4)], np.float64)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0

_OK, _NONFINITE, _MAX_STEPS = 0, 1, 2


class _OdeState(NamedTuple):
    t: jax.Array        # scalar float32 time reached
    x: jax.Array        # state at t
    f: jax.Array        # v(x, t), reused as the next step's first stage (FSAL)
    dt: jax.Array       # proposed next step size
    nfe: jax.Array      # velocity evaluations so far
    steps: jax.Array    # attempted (accepted + rejected) steps
    status: jax.Array   # _OK, _NONFINITE or _MAX_STEPS


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


class RectifiedFlow:
    """Rectified-flow objective and ODE samplers (module docstring: conventions)."""

    def __init__(self, t_eps: float = 0.0):
        # The official code draws t ~ U[0, 1) with no epsilon (its ``ln`` logit-normal flag
        # is unused); t_eps > 0 narrows training to [t_eps, 1 - t_eps) for experiments.
        t_eps = float(t_eps)
        if not 0.0 <= t_eps < 0.5:
            raise ValueError(f"t_eps={t_eps} is outside [0, 0.5); use 0 (the official "
                             "setting) or a small positive value such as 1e-5.")
        self.t_eps = t_eps

    # ------------------------------------------------------------------ training
    def sample_t(self, key: jax.Array, batch: int) -> jax.Array:
        """Training times [B], float32, uniform on [t_eps, 1 - t_eps)."""
        return jax.random.uniform(key, (int(batch),), jnp.float32,
                                  minval=self.t_eps, maxval=1.0 - self.t_eps)

    def interpolate(self, x_data, noise, t) -> jax.Array:
        """x_t = t·data + (1-t)·noise with per-sample t [B]."""
        t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x_data.ndim - 1))
        return t * x_data + (1.0 - t) * noise

    def _velocity(self, out: jax.Array, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if out.shape[:-1] != x.shape[:-1] or out.shape[-1] not in (c, 2 * c):
            raise ValueError(f"model output shape {tuple(out.shape)} does not match x shape "
                             f"{tuple(x.shape)}: the velocity model must return {c} channels "
                             f"(or {2 * c} with learn_sigma, of which the first {c} are used).")
        return out[..., :c]

    def training_losses(self, model_fn: VelocityFn, x_start, t, noise) -> dict:
        """{"loss", "mse", "vb"}, each [B]: loss = mse = mean((v - (data - noise))²), vb = 0."""
        t = jnp.asarray(t)
        if not jnp.issubdtype(t.dtype, jnp.floating):
            raise ValueError(f"flow training times have dtype {t.dtype}; pass float times in "
                             "[0, 1] (RectifiedFlow.sample_t), not integer DDPM timesteps.")
        x_t = self.interpolate(x_start, noise, t)
        v = self._velocity(model_fn(x_t, t.astype(jnp.float32)), x_t)
        mse = mean_flat(jnp.square(v - (x_start - noise)))
        return {"loss": mse, "mse": mse, "vb": jnp.zeros_like(mse)}

    # ------------------------------------------------------------------ sampling
    def sample(self, model_fn: VelocityFn, shape, key, method: str = "euler",
               num_steps: int = 250, atol: float = 1e-6, rtol: float = 1e-3, noise=None,
               progress: bool = False, return_nfe: bool = False, max_steps: int = 2000):
        """Integrate from x(0) = noise ~ N(0, I) (drawn from ``key`` unless given) to t = 1.

        ``num_steps`` is the fixed grid of euler / heun; dopri5 ignores it and adapts its
        steps to ``atol`` / ``rtol``, failing after ``max_steps`` attempted steps. Returns x(1),
        or ``(x(1), nfe)`` with the number of velocity evaluations. Jittable with
        progress=False; outside jit a non-finite result or an exhausted max_steps raises,
        inside jit it shows as NaN output.
        """
        if method not in METHODS:
            raise ValueError(f"unknown flow sampling method {method!r}; choose one of {METHODS}.")
        if method != "dopri5" and (int(num_steps) != num_steps or num_steps < 1):
            raise ValueError(f"num_steps={num_steps} must be a positive integer.")
        if method == "dopri5" and not (atol > 0 and rtol > 0 and int(max_steps) >= 1):
            raise ValueError(f"dopri5 needs atol > 0, rtol > 0 and max_steps >= 1; got "
                             f"atol={atol}, rtol={rtol}, max_steps={max_steps}.")
        if noise is None:
            x0 = jax.random.normal(key, tuple(shape), jnp.float32)
        else:
            x0 = jnp.asarray(noise)
            if x0.shape != tuple(shape):
                raise ValueError(f"noise shape {x0.shape} != requested shape {tuple(shape)}.")

        def vel(x, t):
            tb = jnp.full((x.shape[0],), t, jnp.float32)
            return self._velocity(model_fn(x, tb), x).astype(x.dtype)

        if method == "dopri5":
            x, nfe = self._dopri5(vel, x0, float(atol), float(rtol), int(max_steps), progress)
        else:
            x = self._fixed_grid(vel, x0, method, int(num_steps), progress)
            nfe = int(num_steps) * (2 if method == "heun" else 1)
            if not _is_tracer(x) and not bool(jnp.all(jnp.isfinite(x))):
                raise FloatingPointError(
                    f"{method} sampling produced non-finite values: the velocity model returned "
                    "NaN/Inf; check the parameters, the noise and the guidance scale.")
        return (x, nfe) if return_nfe else x

    def _fixed_grid(self, vel, x0, method: str, n: int, progress: bool) -> jax.Array:
        dt = 1.0 / n

        def step(x, i):
            t = i.astype(jnp.float32) / n
            v = vel(x, t)
            x_euler = x + dt * v
            if method == "euler":
                return x_euler
            return x + 0.5 * dt * (v + vel(x_euler, (i + 1).astype(jnp.float32) / n))

        steps = jnp.arange(n, dtype=jnp.int32)
        if not progress:
            return jax.jit(lambda x: jax.lax.scan(lambda x, i: (step(x, i), None), x, steps)[0])(x0)
        jstep = jax.jit(step)
        x = x0
        for i in _progress(n, method):
            x = jstep(x, steps[i])
        return x

    # ------------------------------------------------------------------ dopri5
    def _dopri5(self, vel, x0, atol: float, rtol: float, max_steps: int, progress: bool):
        a_mat = jnp.asarray(_A_MAT, jnp.float32)
        c_vec = jnp.asarray(_C_VEC, jnp.float32)
        e_vec = jnp.asarray(_E_VEC, jnp.float32)

        def combine(w, k):
            # Multiply-and-sum rather than a dot: GPU/TPU dots may run in TF32/bf16 by
            # default, which would swamp the b5 - b4 error estimate.
            w = w.reshape((7,) + (1,) * (k.ndim - 1))
            return jnp.sum(w * k.astype(jnp.float32), axis=0)

        def init(x):
            # Hairer, Norsett & Wanner II.4 starting step, as torchdiffeq (order 4 -> 1/5).
            f0 = vel(x, jnp.float32(0.0))
            scale = atol + jnp.abs(x) * rtol
            d0, d1 = _rms(x / scale), _rms(f0 / scale)
            h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
            h0 = jnp.minimum(h0, 1.0)  # keeps the probe evaluation inside [0, 1]
            f1 = vel(x + h0.astype(x.dtype) * f0, h0)
            d2 = _rms((f1 - f0) / scale) / h0
            h1 = jnp.where((d1 <= 1e-15) & (d2 <= 1e-15), jnp.maximum(1e-6, h0 * 1e-3),
                           (0.01 / jnp.maximum(d1, d2)) ** 0.2)
            return _OdeState(t=jnp.float32(0.0), x=x, f=f0,
                             dt=jnp.minimum(100.0 * h0, h1).astype(jnp.float32),
                             nfe=jnp.int32(2), steps=jnp.int32(0), status=jnp.int32(_OK))

        def attempt(s: _OdeState) -> _OdeState:
            h = jnp.minimum(s.dt, 1.0 - s.t)
            k = jnp.zeros((7,) + s.x.shape, s.x.dtype).at[0].set(s.f)

            def stage(i, k):
                # A loop over stages traces the model once, not six times (compile time).
                xi = s.x + (h * combine(a_mat[i], k)).astype(s.x.dtype)
                return k.at[i].set(vel(xi, s.t + c_vec[i] * h))

            k = jax.lax.fori_loop(1, 7, stage, k)
            x_new = s.x + (h * combine(a_mat[6], k)).astype(s.x.dtype)
            err = h * combine(e_vec, k)
            tol = atol + rtol * jnp.maximum(jnp.abs(s.x), jnp.abs(x_new)).astype(jnp.float32)
            ratio = _rms(err / tol)
            finite = jnp.isfinite(ratio) & jnp.all(jnp.isfinite(x_new))
            accept = finite & (ratio <= 1.0)
            factor = jnp.clip(_SAFETY * ratio ** -0.2,
                              jnp.where(accept, 1.0, _MIN_FACTOR), _MAX_FACTOR)
            factor = jnp.where(ratio == 0.0, _MAX_FACTOR, factor)
            # Snapping to exactly 1 ends the loop despite float32 rounding of t + h.
            t_new = jnp.where(accept, jnp.where(s.dt >= 1.0 - s.t, 1.0, s.t + h), s.t)
            steps = s.steps + 1
            status = jnp.where(~finite, _NONFINITE,
                               jnp.where((steps >= max_steps) & (t_new < 1.0), _MAX_STEPS, _OK))
            return _OdeState(t=t_new.astype(jnp.float32), x=jnp.where(accept, x_new, s.x),
                             f=jnp.where(accept, k[6], s.f), dt=(h * factor).astype(jnp.float32),
                             nfe=s.nfe + 6, steps=steps, status=status.astype(jnp.int32))

        def running(s: _OdeState):
            return (s.t < 1.0) & (s.status == _OK)

        if not progress:
            # One compiled program instead of eager dispatch of the start-up ops.
            s = jax.jit(lambda x: jax.lax.while_loop(running, attempt, init(x)))(x0)
        else:
            s, jattempt, shown = jax.jit(init)(x0), jax.jit(attempt), 0
            while bool(running(s)):
                s = jattempt(s)
                if int(float(s.t) * 10) > shown or not bool(running(s)):
                    shown = int(float(s.t) * 10)
                    print(f"dopri5: t={float(s.t):.3f} steps={int(s.steps)} nfe={int(s.nfe)}",
                          flush=True)
        if _is_tracer(s.x):
            return jnp.where(s.status == _OK, s.x, jnp.nan), s.nfe
        if int(s.status) == _NONFINITE:
            raise FloatingPointError(
                f"dopri5 sampling produced non-finite values at t={float(s.t):.4f}: the velocity "
                "model returned NaN/Inf; check the parameters, the noise and the guidance scale.")
        if int(s.status) == _MAX_STEPS:
            raise RuntimeError(
                f"dopri5 used max_steps={max_steps} steps and reached only t={float(s.t):.4f} of 1 "
                f"(last step size {float(s.dt):.2e}); raise max_steps or loosen atol={atol} / "
                f"rtol={rtol}.")
        return s.x, int(s.nfe)
