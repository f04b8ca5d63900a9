"""Fixed task-routing masks (DTR, Park et al. 2024): one [T, C] channel mask per timestep.

A block routed by mask m_t computes z' = (1 - m_t) ⊙ z + DiTBlock(m_t ⊙ z) (dit.DiTBlock).
"""
from __future__ import annotations

import numpy as np


def _num_active(channels: int, beta: float) -> int:
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"routing.beta={beta} must be in (0, 1] (the activated fraction).")
    return int(beta * channels)


def dtr_masks(num_tasks: int, channels: int, alpha: float = 4.0, beta: float = 0.8) -> np.ndarray:
    """Sliding-window masks: row t activates int(beta·C) consecutive channels from start_t.

    start_t = round((C - int(beta·C)) · linspace(0, 1, T)[t] ** alpha), with NumPy's
    round-half-to-even, as the official code computes it (the paper's Eq. 4 floors the two ends
    of a half-open window instead, which shifts a few rows by one channel).
    """
    active = _num_active(channels, beta)
    start = np.round((channels - active) * np.linspace(0.0, 1.0, num_tasks) ** alpha)
    start = start.astype(np.int64)
    columns = np.arange(channels)[None, :]
    return ((columns >= start[:, None]) & (columns < start[:, None] + active)).astype(np.float32)


def random_masks(num_tasks: int, channels: int, beta: float, seed: int) -> np.ndarray:
    """R-TR: each task activates its own int(beta·C) channels drawn at random (fixed by seed).

    Each row is an independent draw, as the DTR paper's text and its expected-overlap analysis
    (Appendix B) describe; its pseudo code's single column shuffle would give every task the
    same channels.
    """
    active = _num_active(channels, beta)
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_tasks, channels), np.float32)
    for t in range(num_tasks):
        masks[t, rng.permutation(channels)[:active]] = 1.0
    return masks
