"""Fixed task-routing masks (DTR, Park et al. 2024) and the masking baselines of its Table 8.

A block routed by mask m_t computes z' = (1 - m_t) ⊙ z + DiTBlock(m_t ⊙ z) (dit.DiTBlock).

* DTR: sliding windows that move with t (`dtr_masks`).
* R-TR: int(β·C) random channels per task, a fresh table per block (`random_mask_rows`).
* CDTR: DTR windows over K timestep clusters, each cluster one task (`cdtr_masks`).
* ERCDDT: half the channels shared by every task, the other half cut into K segments, one
  per timestep cluster (`ercddt_masks`).
The clusters are ANT's contiguous timestep clusters (diffusion.weighting.cluster_bounds).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from switch_dit_jax.diffusion.weighting import cluster_bounds


def num_active(channels: int, beta: float) -> int:
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"routing.beta={beta} must be in (0, 1] (the activated fraction).")
    return int(beta * channels)


def dtr_masks(num_tasks: int, channels: int, alpha: float = 4.0, beta: float = 0.8) -> np.ndarray:
    """Sliding-window masks: row t activates int(beta·C) consecutive channels from start_t.

    start_t = round((C - int(beta·C)) · linspace(0, 1, T)[t] ** alpha), with NumPy's
    round-half-to-even, as the official code computes it (the paper's Eq. 4 floors the two ends
    of a half-open window instead, which shifts a few rows by one channel).
    """
    active = num_active(channels, beta)
    start = np.round((channels - active) * np.linspace(0.0, 1.0, num_tasks) ** alpha)
    start = start.astype(np.int64)
    columns = np.arange(channels)[None, :]
    return ((columns >= start[:, None]) & (columns < start[:, None] + active)).astype(np.float32)


def random_mask_rows(seed: int, block: int, t: jax.Array, channels: int,
                     beta: float) -> jax.Array:
    """R-TR masks [len(t), C] of block `block` for tasks t: int(beta·C) random channels each.

    Row (block, t) is a function of (seed, block, t) alone, drawn on the device when needed, so
    every block has its own table, as the official code builds one TaskRouter (one
    np.random draw) per block, without a [depth, T, C] constant in the program. Each row is an
    independent draw, as the DTR paper's text and its expected-overlap analysis (Appendix B)
    describe; its pseudo code's single column shuffle would give every task the same channels.
    """
    active = num_active(channels, beta)
    block_key = jax.random.fold_in(jax.random.PRNGKey(seed), block)

    def row(task):
        u = jax.random.uniform(jax.random.fold_in(block_key, task), (channels,))
        chosen = jax.lax.top_k(u, active)[1]
        return jnp.zeros((channels,), jnp.float32).at[chosen].set(1.0)

    return jax.vmap(row)(jnp.asarray(t, jnp.int32).reshape(-1))


def random_masks(num_tasks: int, channels: int, beta: float, seed: int,
                 block: int = 0) -> np.ndarray:
    """The whole [T, C] R-TR table of one block (what `random_mask_rows` draws row by row)."""
    rows = jax.jit(random_mask_rows, static_argnums=(3, 4))
    return np.asarray(rows(seed, block, jnp.arange(num_tasks), channels, beta))


def timestep_clusters(num_tasks: int, num_clusters: int) -> np.ndarray:
    """[T] cluster index of every timestep (K contiguous clusters, ANT's rounding)."""
    if not 1 <= num_clusters <= num_tasks:
        raise ValueError(f"routing.clusters={num_clusters} must be in [1, num_tasks="
                         f"{num_tasks}].")
    cluster = np.zeros(num_tasks, np.int64)
    for k, (lo, hi) in enumerate(cluster_bounds(num_tasks, num_clusters)):
        cluster[lo:hi] = k
    return cluster


def cdtr_masks(num_tasks: int, channels: int, num_clusters: int = 8, alpha: float = 4.0,
               beta: float = 0.8) -> np.ndarray:
    """CDTR: row t is the DTR window of its cluster, the K clusters being K DTR tasks."""
    windows = dtr_masks(num_clusters, channels, alpha, beta)
    return windows[timestep_clusters(num_tasks, num_clusters)]


def ercddt_masks(num_tasks: int, channels: int, num_clusters: int = 8) -> np.ndarray:
    """ERCDDT: channels [0, C//2) serve every task; the rest are cut into K near-equal
    segments, and row t also activates the segment of its cluster."""
    shared = channels // 2
    edges = [shared + (channels - shared) * k // num_clusters for k in range(num_clusters + 1)]
    if min(np.diff(edges)) < 1:
        raise ValueError(f"ERCDDT splits the {channels - shared} unshared channels into "
                         f"routing.clusters={num_clusters} segments, so some would be empty; "
                         "use fewer clusters or a wider model.")
    segments = np.zeros((num_clusters, channels), np.float32)
    segments[:, :shared] = 1.0
    for k in range(num_clusters):
        segments[k, edges[k]:edges[k + 1]] = 1.0
    return segments[timestep_clusters(num_tasks, num_clusters)]
