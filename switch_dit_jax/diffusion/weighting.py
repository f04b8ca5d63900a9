"""Per-timestep loss weighting of the eps-MSE term (DTR Table 3 / Switch-DiT's MTL baselines).

* constant: 1.
* Min-SNR-γ (Hang et al. 2023), eps-prediction form: min(snr, γ) / snr.
* P2 (Choi et al. 2022): 1 / (k + snr)^γ, applied per sample (the official DTR/Switch-DiT
  code broadcasts it over the image width instead).
* ANT-UW (Go et al. 2023): T split into K = 8 contiguous clusters; every batch holds B/K
  timesteps from each cluster (stratified); each cluster k has a learnable log-variance s_k
  (its own learning rate, 0.025) and contributes 0.5·(exp(-s_k)·L_k + s_k), where L_k is the
  mean loss of its samples divided by K (official form).
As in the official code the weight multiplies the `mse` term only; `vb` stays unweighted.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTINGS = ("constant", "min_snr", "p2", "ant_uw")


def snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    return alphas_cumprod / (1.0 - alphas_cumprod)


def mse_weights(kind: str, alphas_cumprod: np.ndarray, t: jax.Array, *, min_snr_gamma: float = 5.0,
                p2_gamma: float = 1.0, p2_k: float = 1.0) -> jax.Array:
    """Per-sample weight [B] of the eps-MSE for timesteps t (constant for ant_uw)."""
    s = snr(np.asarray(alphas_cumprod, np.float64))
    if kind in ("constant", "ant_uw"):
        table = np.ones_like(s)
    elif kind == "min_snr":
        table = np.minimum(s, min_snr_gamma) / s
    elif kind == "p2":
        table = 1.0 / (p2_k + s) ** p2_gamma
    else:
        raise ValueError(f"loss.weighting={kind!r}; use one of {list(WEIGHTINGS)}.")
    return jnp.asarray(table, jnp.float32)[t]


def cluster_bounds(num_timesteps: int, num_clusters: int) -> np.ndarray:
    """[K, 2] half-open timestep ranges of the ANT-UW clusters (official rounding)."""
    edges = [int(num_timesteps / num_clusters * k) for k in range(num_clusters + 1)]
    return np.array(list(zip(edges[:-1], edges[1:])), np.int32)


def stratified_timesteps(key: jax.Array, batch: int, num_timesteps: int,
                         num_clusters: int) -> jax.Array:
    """B timesteps, the k-th block of B/K drawn uniformly from cluster k."""
    if batch % num_clusters:
        raise ValueError(f"ANT-UW needs the batch ({batch}) divisible by loss.uw_clusters="
                         f"{num_clusters}.")
    bounds = jnp.asarray(cluster_bounds(num_timesteps, num_clusters))
    per = batch // num_clusters
    low = jnp.repeat(bounds[:, 0], per)
    high = jnp.repeat(bounds[:, 1], per)
    return jax.random.randint(key, (batch,), low, high)


def uncertainty_weighted_loss(per_sample: jax.Array, log_vars: jax.Array) -> jax.Array:
    """Σ_k 0.5·(exp(-s_k)·L_k + s_k) for a batch laid out by `stratified_timesteps`."""
    num_clusters = log_vars.shape[0]
    cluster_loss = per_sample.reshape(num_clusters, -1).mean(axis=1) / num_clusters
    return jnp.sum(0.5 * (jnp.exp(-log_vars) * cluster_loss + log_vars))
