"""Timestep respacing: pick a subset of a diffusion process's steps (ADM semantics).

A respaced process keeps the original alphas_cumprod at the kept steps and derives new
betas from them, so the model (trained on the full process) is called with the original
timesteps through ``timestep_map``.
"""
from __future__ import annotations

import numpy as np

_ACCEPTED = ("'' (no respacing), an integer step count such as '250', comma-separated "
             "per-section counts such as '10,15,20', or 'ddimN' such as 'ddim50'")


def _bad(value, num_timesteps, why: str) -> ValueError:
    return ValueError(f"invalid timestep_respacing {value!r} for a {num_timesteps}-step "
                      f"process: {why}. Accepted forms: {_ACCEPTED}.")


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """Sorted original timesteps kept by ``section_counts`` (a respacing string).

    "" / None keeps everything.  "ddimN" looks for the integer stride whose
    ``range(0, T, stride)`` has exactly N elements (the DDIM paper's uniform skipping).
    Otherwise the process is cut into len(counts) near-equal sections (the first
    ``T % len(counts)`` one step longer) and each section is sampled evenly, endpoints
    included.
    """
    raw = section_counts
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return list(range(num_timesteps))
    if isinstance(raw, (int, np.integer)):
        raw = str(int(raw))
    if not isinstance(raw, str):
        raise _bad(raw, num_timesteps, "expected a string")
    text = raw.strip()

    if text.startswith("ddim"):
        try:
            desired = int(text[len("ddim"):])
        except ValueError:
            raise _bad(raw, num_timesteps, "'ddim' must be followed by an integer") from None
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise _bad(raw, num_timesteps, f"no integer stride gives exactly {desired} steps")

    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        raise _bad(raw, num_timesteps, "could not parse the section counts") from None
    if any(c < 1 for c in counts):
        raise _bad(raw, num_timesteps, "section counts must be positive")
    if len(counts) > num_timesteps:
        raise _bad(raw, num_timesteps, "more sections than timesteps")

    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise _bad(raw, num_timesteps,
                       f"section {i} has {size} steps, cannot take {count}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the float stride (rather than i * stride) and use Python's
        # round-half-to-even so the kept steps are bit-identical to ADM/DiT's.
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def respace_betas(betas: np.ndarray, use_timesteps) -> tuple[np.ndarray, np.ndarray]:
    """New float64 betas for the kept steps, and the int64 map respaced index -> original t.

    The new process must reach the same alpha_bar at each kept step, so
    beta_new = 1 - alpha_bar[t_k] / alpha_bar[t_{k-1}].
    """
    betas = np.asarray(betas, dtype=np.float64)
    use = sorted(set(int(t) for t in use_timesteps))
    if len(use) == len(betas):
        # Keeping every step: return the schedule untouched instead of re-deriving it
        # through cumprod/ratio, which would perturb the last ulp.
        return betas.copy(), np.arange(len(betas), dtype=np.int64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    last, new_betas = 1.0, []
    for t in use:
        new_betas.append(1.0 - alphas_cumprod[t] / last)
        last = alphas_cumprod[t]
    return np.asarray(new_betas, dtype=np.float64), np.asarray(use, dtype=np.int64)
