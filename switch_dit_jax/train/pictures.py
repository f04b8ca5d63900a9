"""Routing and capacity pictures of a training run, for TensorBoard and W&B.

At every sample step (train.sample_every) a Switch-DiT run with learned gates renders the
gate-vs-prior and denoising-path pictures of its EMA weights (analysis/routing.py), and a
DiffMoE run the capacity picture of the samples it has just drawn (analysis/capacity.py). The
PNGs go to `<workdir>/analysis/` (the latest ones, as the analysis CLIs write them) and to the
writers as images under `routing/...` and `capacity/...`, where every step is kept.

Single-process runs only: the pictures read the EMA weights on the host, which in a
multi-process run no one process holds whole (use the analysis CLIs on a checkpoint there).
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
from PIL import Image


def _enabled() -> bool:
    return jax.process_count() == 1


def _is_diffmoe(model) -> bool:
    return (getattr(model, "ffn", None) or {}).get("kind") == "diffmoe"


def capacity_recorder(model):
    """A CapacityRecorder to pass to sample.generate (None when no picture will use it)."""
    if not (_enabled() and _is_diffmoe(model)):
        return None
    from switch_dit_jax.analysis.capacity import CapacityRecorder
    return CapacityRecorder()


def _read_png(path: str) -> np.ndarray:
    """[1, H, W, 3] uint8: the writers take batches of HWC images."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))[None]


def training_pictures(model, config, ema_params, workdir: str, recorder=None) -> dict:
    """{image name: [1, H, W, 3] uint8} of the pictures this model has ({} for the rest)."""
    if not _enabled():
        return {}
    out_dir = os.path.join(workdir, "analysis")
    images = {}
    routing = getattr(model, "routing", None) or {}
    if routing.get("kind") == "switch" and routing.get("allocation") == "learned":
        from switch_dit_jax.analysis import routing as routing_lib
        # A batch of one on the host: no logical axis is split over the training mesh here.
        with nn.logical_axis_rules(()):
            paths = routing_lib.routing_pictures(model, jax.device_get(ema_params), out_dir)
        images.update({f"routing/{name}": _read_png(p) for name, p in paths.items()})
    if recorder is not None:
        from switch_dit_jax.analysis import capacity
        ts, caps = recorder.per_step()
        summary = capacity.summarize(ts, caps, jax.device_get(ema_params),
                                     model.ffn["num_experts"],
                                     config.diffusion.objective == "flow")
        path = os.path.join(out_dir, "capacity.png")
        os.makedirs(out_dir, exist_ok=True)
        capacity.render(summary, path)
        images["capacity/c_infer"] = _read_png(path)
    return images
