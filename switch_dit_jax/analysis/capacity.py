"""DiffMoE inference capacity while sampling (DiffMoE Eq. 8, 9, 15, 40 and Fig. 12).

    python -m switch_dit_jax.analysis.capacity --config=configs/diffmoe_l_e16.py --workdir=DIR

samples `config.sample.num_samples` images with the EMA weights of the latest checkpoint while
recording, for every model evaluation, the capacity C^E = E·K^E/(B·S) of every expert of every
mixture layer, and writes DIR/analysis/capacity.json (C_infer per step, its average C_infer^avg,
and the average activated parameters of Eq. 40) and DIR/analysis/capacity.png (mixture layers
as rows, sampling steps from noise to data as columns, brighter = more capacity).
"""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict

import jax
import numpy as np
from PIL import Image, ImageDraw

from switch_dit_jax.train.state import model_params

log = logging.getLogger("switch_dit_jax")


class CapacityRecorder:
    """Host callback target: collects (t, capacities [L, E]) of every model evaluation.

    Evaluations at the same t (repeated by devices or Heun's two stages) are averaged.
    """

    def __init__(self):
        self._by_t = defaultdict(list)

    def __call__(self, t, capacities, sample_capacities=None) -> None:
        del sample_capacities  # per-sample shares: analysis/class_capacity.py
        self._by_t[float(np.asarray(t))].append(np.asarray(capacities, np.float64))

    def per_step(self) -> tuple[np.ndarray, np.ndarray]:
        """(t values in sampling order, capacities [steps, L, E])."""
        if not self._by_t:
            raise ValueError("no capacity was recorded: the model has no DiffMoE layers "
                             "(model.ffn.kind='diffmoe') or sampling did not run.")
        ts = sorted(self._by_t)
        return np.array(ts), np.stack([np.mean(self._by_t[t], axis=0) for t in ts])


def activated_parameters(params, c_infer_avg: float, num_experts: int) -> float:
    """Eq. 40: ((1 + C_avg)/(1 + N_E))·#FFN + #everything else, with #FFN the parameters of
    every FFN (the dense MLPs and all experts), as the paper counts them."""
    ffn = other = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(model_params(params))[0]:
        keys = [getattr(k, "key", "") for k in path]
        in_ffn = "mlp" in keys and (keys[-2] in ("fc1", "fc2") or "experts" in keys)
        if in_ffn:
            ffn += leaf.size
        else:
            other += leaf.size
    return (1 + c_infer_avg) / (1 + num_experts) * ffn + other


def summarize(ts: np.ndarray, caps: np.ndarray, params, num_experts: int,
              flow: bool) -> dict:
    c_step = caps.mean(axis=(1, 2))  # Eq. 9 at every step
    c_avg = float(c_step.mean())     # C_infer^avg over the sampling steps
    order = np.arange(len(ts)) if flow else np.arange(len(ts))[::-1]  # noise -> data
    return {"t": ts[order].tolist(), "c_infer": c_step[order].tolist(),
            "c_infer_per_layer": caps.mean(axis=2)[order].tolist(), "c_infer_avg": c_avg,
            "activated_parameters": activated_parameters(params, c_avg, num_experts)}


def render(summary: dict, path: str) -> None:
    """Heat map of C^E per mixture layer (rows) over the sampling steps (noise -> data), its
    colour scale stretched over the observed range, and C_infer per step as a line below."""
    per_layer = np.asarray(summary["c_infer_per_layer"]).T  # [L, steps]
    c_step = np.asarray(summary["c_infer"])
    layers, steps = per_layer.shape
    cell_w, cell_h = max(2, 480 // steps), max(18, 144 // layers)
    lo, hi = float(per_layer.min()), float(per_layer.max())
    level = (per_layer - lo) / max(hi - lo, 1e-6)
    rgb = np.stack([60 + level * 195, 40 + level * 150, 90 - level * 60], -1)
    image = Image.fromarray(rgb.astype(np.uint8)).resize((steps * cell_w, layers * cell_h),
                                                         Image.NEAREST)
    left, top, plot_h = 58, 22, 90
    canvas = Image.new("RGB", (image.width + left + 10, top + image.height + plot_h + 48),
                       "white")
    canvas.paste(image, (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"capacity C^E per mixture layer over sampling (noise -> data); "
                      f"C_infer avg {summary['c_infer_avg']:.3f}", fill="black")
    for i in range(layers):
        draw.text((4, top + i * cell_h + cell_h // 2 - 6), f"layer {i}", fill="black")
    y0 = top + image.height + 4
    draw.text((left, y0), f"dark = {lo:.2f}, bright = {hi:.2f}", fill="black")
    # C_infer per step, on a scale that always shows the dense-compute line C = 1.
    c_lo, c_hi = min(c_step.min(), 1.0), max(c_step.max(), 1.0)
    span = max(c_hi - c_lo, 1e-6)
    plot_top = y0 + 18
    to_y = lambda c: plot_top + plot_h - (c - c_lo) / span * plot_h  # noqa: E731
    xs = left + (np.arange(steps) + 0.5) * cell_w
    draw.line([(left, to_y(1.0)), (left + image.width, to_y(1.0))], fill=(170, 170, 170))
    draw.line(list(zip(xs.tolist(), [to_y(c) for c in c_step])), fill=(200, 80, 20), width=2)
    draw.text((4, plot_top - 6), f"{c_hi:.2f}", fill="black")
    draw.text((4, plot_top + plot_h - 6), f"{c_lo:.2f}", fill="black")
    draw.text((left, plot_top + plot_h + 8), "C_infer per step (grey: C = 1, the dense compute)",
              fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)


def report(model, config, state, mesh, shardings, out_dir: str) -> dict:
    """Sample with capacity recording; write capacity.json and capacity.png."""
    from switch_dit_jax import sample
    recorder = CapacityRecorder()
    sample.generate(model, config, state.ema_params, state.ema_model_state, mesh,
                    shardings.ema_params, on_capacity=recorder)
    ts, caps = recorder.per_step()
    summary = summarize(ts, caps, state.ema_params, model.ffn["num_experts"],
                        config.diffusion.objective == "flow")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "capacity.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    render(summary, os.path.join(out_dir, "capacity.png"))
    log.info("C_infer^avg = %.4f, average activated parameters = %s", summary["c_infer_avg"],
             f"{summary['activated_parameters']:,.0f}")
    return summary


def main(argv) -> None:
    del argv
    from absl import flags
    from switch_dit_jax.train.loop import restore_latest

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    try:
        model, mesh, state, shardings = restore_latest(config, workdir)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    report(model, config, state, mesh, shardings, os.path.join(workdir, "analysis"))


if __name__ == "__main__":
    from absl import app, flags as absl_flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    absl_flags.DEFINE_string("workdir", None, "Run directory with checkpoints.")
    app.run(main)
