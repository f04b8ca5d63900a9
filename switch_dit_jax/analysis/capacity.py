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

from switch_dit_jax.analysis import figures
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


def render(summary: dict, path: str, run: str = "", step: int | None = None):
    """DiffMoE Fig. 12: the capacity C^E of every mixture layer (rows) over the sampling steps
    from noise to data (colour bar over the observed range), and below it C_infer per step with
    each layer's capacity as a line, against the dense compute C = 1. Returns the figure."""
    per_layer = np.asarray(summary["c_infer_per_layer"]).T  # [L, steps]
    c_step = np.asarray(summary["c_infer"])
    layers, steps = per_layer.shape
    fig = figures.new_figure(max(6.5, min(0.05 * steps + 5.0, 12.0)),
                             2.6 + 0.32 * layers + 2.4)
    heat, line = fig.subplots(2, 1, sharex=True,
                              gridspec_kw={"height_ratios": [max(layers, 2), 6]})
    image = heat.imshow(per_layer, aspect="auto", interpolation="nearest", cmap="magma",
                        extent=(0.5, steps + 0.5, layers - 0.5, -0.5))
    fig.colorbar(image, ax=heat, label=r"layer capacity $C^E$", pad=0.02)
    every = max(1, -(-layers // 12))
    heat.set_yticks(np.arange(0, layers, every))
    heat.set_yticklabels([f"MoE layer {i}" for i in range(0, layers, every)])
    heat.set_title(r"capacity $C^E$ of each mixture layer, averaged over its experts", fontsize=9,
                   loc="left")
    x = np.arange(1, steps + 1)
    if layers <= 8:
        for i in range(layers):
            line.plot(x, per_layer[i], linewidth=1.0, alpha=0.8, label=f"MoE layer {i}")
    line.plot(x, c_step, color="black", linewidth=2.0, label=r"$C_\mathrm{infer}$ (all layers)")
    line.axhline(1.0, color="grey", linestyle="--", linewidth=1.0, label="C = 1 (dense compute)")
    line.set_xlabel(f"sampling step (1 = pure noise, {steps} = data)")
    line.set_ylabel("capacity")
    line.set_title(r"$C_\mathrm{infer}$ per step; its average over the steps "
                   f"{summary['c_infer_avg']:.3f}",
                   fontsize=9, loc="left")
    line.grid(True, alpha=0.3)
    line.legend(fontsize=8, loc="best", ncols=2 if layers > 3 else 1)
    fig.colorbar(image, ax=line).remove()  # keeps both panels the same width
    fig.suptitle(figures.run_title("DiffMoE capacity while sampling", run, step), fontsize=11)
    return figures.save(fig, path)


def report(model, config, state, mesh, shardings, out_dir: str, run: str = "") -> dict:
    """Sample with capacity recording; write capacity.json and capacity.png (titled with `run`
    and the state's step)."""
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
    render(summary, os.path.join(out_dir, "capacity.png"), run, int(state.step))
    log.info("C_infer^avg = %.4f, average activated parameters = %s", summary["c_infer_avg"],
             f"{summary['activated_parameters']:,.0f}")
    return summary


if __name__ == "__main__":
    from switch_dit_jax.analysis.cli import run_on_workdir

    run_on_workdir(lambda config, workdir, model, mesh, state, shardings, flags: report(
        model, config, state, mesh, shardings, os.path.join(workdir, "analysis"),
        figures.run_name(workdir)))
