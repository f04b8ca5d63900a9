"""DiffMoE's per-class compute: classes ranked by their C_infer^avg (DiffMoE Figs. 1d, 13, 14).

    python -m switch_dit_jax.analysis.class_capacity --config=configs/diffmoe_l_e16.py \
        --workdir=DIR [--class_names=imagenet_classes.txt]

samples one image of every class in a single batch (the paper: "1K different class labels in a
batch"; the classes compete for the experts of one token pool) with the EMA weights of the
latest checkpoint, and records for every model evaluation and every dynamic mixture layer each
image's share of the compute: Σ_e (its tokens expert e processed) / S, whose mean over the
images is that layer's C_infer (Eq. 9). Averaged over the layers and the sampling steps it is
the image's C_infer^avg; under classifier-free guidance both passes of an image count. Writes
DIR/analysis/class_capacity.json (every class with its C_infer^avg, hardest first) and
DIR/analysis/class_capacity.png (all classes ranked, and the 10 hardest and 10 easiest by
name). `--class_names` is a local text file with one class name per line, in label order.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from collections import defaultdict

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from switch_dit_jax.errors import UserError

log = logging.getLogger("switch_dit_jax")
SHOWN = 10  # hardest and easiest classes named in the picture, as in Figs. 13 and 14


class SampleCapacityRecorder:
    """Host callback target of `sample.generate(on_capacity=...)`: per-image shares [L, n]."""

    def __init__(self):
        self._by_t = defaultdict(list)

    def __call__(self, t, capacities, sample_capacities) -> None:
        del capacities
        self._by_t[float(np.asarray(t))].append(np.asarray(sample_capacities, np.float64))

    def per_image(self, batch: int) -> np.ndarray:
        """C_infer^avg of each of the `batch` images: over layers, evaluations and steps.

        A guided evaluation of the doubled batch (sample.cfg_pool='joint') holds the
        conditional and the unconditional pass of each image: the two are averaged, as the
        two calls of the separate pools are.
        """
        steps = []
        for t in sorted(self._by_t):
            calls = []
            for shares in self._by_t[t]:
                if shares.shape[0] == 0:
                    raise UserError("the model has no dynamic DiffMoE layer (model.ffn.kind="
                                    "'diffmoe', inference 'dynamic' or 'interval'), so no "
                                    "image has a capacity of its own to rank.")
                if shares.shape[1] == 2 * batch:
                    shares = shares.reshape(shares.shape[0], 2, batch).mean(1)
                calls.append(shares.mean(0))
            steps.append(np.mean(calls, axis=0))
        if not steps:
            raise UserError("no capacity was recorded: sampling did not run a DiffMoE layer.")
        return np.mean(steps, axis=0)


def class_ranking(per_image: np.ndarray, labels: np.ndarray, names: list[str] | None = None
                  ) -> list[dict]:
    """[{class, name, c_infer_avg}] of every sampled class (images of a class averaged),
    hardest (highest compute) first."""
    rows = []
    for label in np.unique(labels):
        name = names[label] if names else f"class {label}"
        rows.append({"class": int(label), "name": name,
                     "c_infer_avg": float(per_image[labels == label].mean())})
    return sorted(rows, key=lambda r: (-r["c_infer_avg"], r["class"]))


def read_class_names(path: str, num_classes: int) -> list[str]:
    if not os.path.isfile(path):
        raise UserError(f"--class_names={path!r} does not exist; pass a local text file with "
                        "one class name per line, in label order.")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != num_classes:
        raise UserError(f"--class_names={path!r} has {len(names)} names but the model has "
                        f"{num_classes} classes; give one name per class, in label order.")
    return names


def render(ranking: list[dict], path: str, title: str) -> Figure:
    """Left: every class's C_infer^avg in rank order, coloured by it (colour bar), with the
    mean and the dense compute C = 1. Right: the hardest and the easiest classes by name."""
    values = np.array([r["c_infer_avg"] for r in ranking])
    shown = min(SHOWN, len(ranking))
    fig = Figure(figsize=(11.0, 4.2 + 0.12 * shown), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, width_ratios=[1.5, 1.0])
    ranked, hard, easy = (fig.add_subplot(grid[:, 0]), fig.add_subplot(grid[0, 1]),
                          fig.add_subplot(grid[1, 1]))
    lo, hi = float(values.min()), float(max(values.max(), values.min() + 1e-6))
    norm, cmap = Normalize(lo, hi), matplotlib.colormaps["viridis"]
    colour = lambda v: cmap(norm(v))  # noqa: E731
    rank = np.arange(1, len(values) + 1)
    ranked.bar(rank, values, width=1.0, color=colour(values), linewidth=0)
    ranked.axhline(values.mean(), color="black", linewidth=1.2,
                   label=f"mean over classes {values.mean():.3f}")
    ranked.axhline(1.0, color="grey", linestyle="--", linewidth=1.0, label="C = 1 (dense compute)")
    ranked.set_xlim(0.5, len(values) + 0.5)
    pad = 0.1 * max(hi - lo, 1e-3)
    ranked.set_ylim(min(lo, 1.0) - pad, max(hi, 1.0) + pad)
    ranked.set_xlabel("class rank (1 = most compute)")
    ranked.set_ylabel(r"$C_\mathrm{infer}^\mathrm{avg}$ of the class's image")
    ranked.set_title(f"all {len(values)} classes, ranked", fontsize=9, loc="left")
    ranked.legend(fontsize=8, loc="upper right")
    fig.colorbar(ScalarMappable(norm, cmap), ax=ranked, pad=0.01,
                 label=r"$C_\mathrm{infer}^\mathrm{avg}$")
    for ax, rows, what in ((hard, ranking[:shown], "hardest (most compute)"),
                           (easy, ranking[::-1][:shown], "easiest (least compute)")):
        v = np.array([r["c_infer_avg"] for r in rows])
        ax.barh(np.arange(len(rows)), v, color=colour(v))
        ax.set_yticks(np.arange(len(rows)))
        ax.set_yticklabels([r["name"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(min(lo, 1.0) - pad, max(hi, 1.0) + pad)
        ax.set_xlabel(r"$C_\mathrm{infer}^\mathrm{avg}$", fontsize=8)
        ax.set_title(f"top {len(rows)} {what}", fontsize=9, loc="left")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, facecolor="white")
    return fig


def report(model, config, state, mesh, shardings, out_dir: str,
           class_names: str | None = None) -> list[dict]:
    """Sample one image per class in one batch; write class_capacity.json and .png."""
    from switch_dit_jax import sample
    if model.num_classes < 2:
        raise UserError("per-class capacity needs a class-conditional model; this one has "
                        f"model.num_classes={model.num_classes}.")
    names = read_class_names(class_names, model.num_classes) if class_names else None
    config = copy.deepcopy(config)
    config.sample.labels = ""  # 0, 1, ..., num_classes - 1
    config.sample.num_samples = config.sample.batch_size = model.num_classes
    recorder = SampleCapacityRecorder()
    _, labels = sample.generate(model, config, state.ema_params, state.ema_model_state, mesh,
                                shardings.ema_params, on_capacity=recorder)
    # generate rounds the batch up to the device count; the extra images come last.
    batch = -(-model.num_classes // mesh.size) * mesh.size
    per_image = recorder.per_image(batch)[:len(labels)]
    ranking = class_ranking(per_image, np.asarray(labels), names)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "class_capacity.json"), "w", encoding="utf-8") as f:
        json.dump({"step": int(state.step), "classes": ranking}, f, indent=1)
    render(ranking, os.path.join(out_dir, "class_capacity.png"),
           f"DiffMoE compute per class while sampling ({config.sample.num_steps} steps, "
           f"CFG {config.sample.cfg_scale}), step {int(state.step):,}")
    log.info("hardest class %s (C_infer^avg %.4f), easiest %s (%.4f)", ranking[0]["name"],
             ranking[0]["c_infer_avg"], ranking[-1]["name"], ranking[-1]["c_infer_avg"])
    return ranking


if __name__ == "__main__":
    from switch_dit_jax.analysis.cli import run_on_workdir

    run_on_workdir(
        lambda config, workdir, model, mesh, state, shardings, flags: report(
            model, config, state, mesh, shardings, os.path.join(workdir, "analysis"),
            flags.class_names or None),
        lambda flags: flags.DEFINE_string("class_names", "",
                                          "Text file: one class name per line."))
