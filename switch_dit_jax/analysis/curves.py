"""Several runs' metrics in one picture, one colour per run (the papers' DiT vs DTR vs
Switch-DiT convergence curves):

    python -m switch_dit_jax.analysis.curves runs/dit runs/dtr runs/switchdit \
        --metric=loss,loss_t,fd,accuracy --out=curves.png

Each RUN_DIR is a training workdir holding `metrics.jsonl` (train/metrics.py: one JSON object
per line, `{"step": s, name: value, ...}`). `--metric` takes names from `metrics.jsonl` as they
are (`prior_loss`, `eval/digits_fd`, ...) or these short names:

  loss      the training loss, smoothed (below)
  loss_t    the loss of each timestep bucket (`loss/t_bucket_k`, bucket k of K covering
            t in [k·T/K, (k+1)·T/K)) at each run's last logged step, smoothed, against t/T
  fid, sfid, is, precision, recall    eval/fid, eval/sfid, eval/inception_score, ...
  fd, accuracy                        the digits' eval/digits_fd, eval/digits_classifier_accuracy

Training scalars (all but `eval/...`) are logged as means over `train.log_every` steps and are
drawn faintly as logged and boldly smoothed by a debiased exponential moving average,
m_i = w·m_{i-1} + (1-w)·x_i from m_0 = 0, drawn as s_i = m_i / (1 - w^i) for the i-th logged
value (TensorBoard's smoothing; `--smoothing=w`, 0 = none). By default w = 0.6 for a series
of at least 20 logged values and none for a shorter one, whose few values are already means
over log_every steps and would only lag. Evaluation metrics are drawn as measured.
Runs whose paths differ only in a `seed<N>` component (runs/dit/seed0, runs/dit/seed1, ...) are
drawn as one line, their mean over the seeds at each step, with their range shaded.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from switch_dit_jax.analysis import figures
from switch_dit_jax.errors import BadFileError, UserError

ALIASES = {"loss": "loss", "fid": "eval/fid", "sfid": "eval/sfid", "is": "eval/inception_score",
           "precision": "eval/precision", "recall": "eval/recall", "fd": "eval/digits_fd",
           "accuracy": "eval/digits_classifier_accuracy"}
BUCKET = re.compile(r"^loss/t_bucket_(\d+)$")
SEED = re.compile(r"^seed\d+$")
LABELS = {"loss": "training loss", "diffusion_loss": "diffusion loss",
          "eval/fid": "FID", "eval/sfid": "sFID",
          "eval/inception_score": "Inception Score", "eval/precision": "precision",
          "eval/recall": "recall", "eval/digits_fd": "digits FD (classifier features)",
          "eval/digits_classifier_accuracy": "digits classifier accuracy"}


@dataclass
class Run:
    name: str
    series: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # steps, values


def read_metrics(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{key: (steps, values)} of a run's metrics.jsonl; a step logged twice keeps its last row."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir!r} has no metrics.jsonl; pass the workdir of a training run "
                        "(the directory given to switch_dit_jax.main --workdir).")
    by_key: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = int(row.pop("step"))
            except (ValueError, KeyError, TypeError, AttributeError):
                if line.endswith("\n"):
                    raise BadFileError(f"{path!r} line {number} is not a metrics row "
                                       '({"step": ..., name: value}); remove the line.') from None
                continue  # a last line cut short by a crash; the trainer drops it on resume
            for key, value in row.items():
                if isinstance(value, (int, float)):
                    by_key.setdefault(key, {})[step] = float(value)
    return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)]))
            for k, v in by_key.items()}


def run_names(run_dirs: list[str]) -> list[str]:
    """The shortest trailing path of each run that tells the runs apart (runs/a/dit vs runs/b/dit
    are a/dit and b/dit) and names more than a seed (runs/dit/seed0 is dit/seed0)."""
    parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in run_dirs]
    least = 2 if any(SEED.match(p[-1]) for p in parts) else 1
    for depth in range(least, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(i) for i in range(len(run_dirs))]  # the same directory given twice


def default_weight(num_values: int) -> float:
    return 0.6 if num_values >= 20 else 0.0


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing); weight 0 returns values."""
    out, last = np.empty_like(values, dtype=np.float64), 0.0
    for i, x in enumerate(values):
        last = weight * last + (1 - weight) * x
        out[i] = last / (1 - weight ** (i + 1)) if weight > 0 else x
    return out


def group_seeds(names: list[str], runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """Runs whose names differ only in a seed<N> component, in first-seen order."""
    groups: dict[str, list[Run]] = {}
    for name, run in zip(names, runs):
        key = "/".join(p for p in name.split("/") if not SEED.match(p)) or name
        groups.setdefault(key, []).append(run)
    return list(groups.items())


def resolve_metrics(requested: list[str], runs: list[Run]) -> list[str]:
    """Keys (or 'loss_t') to draw; an unknown name is one sentence listing what the runs have."""
    have = set().union(*(r.series for r in runs))
    buckets = any(BUCKET.match(k) for k in have)
    out = []
    for name in requested:
        key = "loss_t" if name == "loss_t" else ALIASES.get(name, name)
        if (key == "loss_t" and buckets) or key in have:
            out.append(key)
            continue
        short = [a for a, k in ALIASES.items() if k in have] + (["loss_t"] if buckets else [])
        raw = sorted(k for k in have if not BUCKET.match(k) and k not in ALIASES.values())
        raise UserError(f"metric {name!r} is in none of the runs "
                        f"({', '.join(r.name for r in runs)}); choose from "
                        f"{', '.join(short + raw)} (digits runs log 'fd', not 'fid').")
    return out


def _stack(runs: list[Run], key: str, weight: float):
    """(steps shared by the runs that have `key`, their values [runs, steps]) after smoothing."""
    series = [r.series[key] for r in runs if key in r.series]
    if not series:
        return None, None
    steps = series[0][0]
    for s, _ in series[1:]:
        steps = np.intersect1d(steps, s)
    values = np.stack([smooth(v, weight)[np.isin(s, steps)] for s, v in series])
    return steps, values


def _log_scale_if_wide(ax) -> None:
    """Log y when the plotted values are positive and span more than a factor 3 (losses fall by
    orders of magnitude; ANT-UW's can be negative), labelled at 1, 2 and 5 per decade."""
    values = np.concatenate([np.asarray(line.get_ydata(), float) for line in ax.get_lines()]
                            or [np.ones(1)])
    if not (np.all(values > 0) and values.max() > 3 * values.min()):
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _draw_over_steps(ax, groups, key: str, weight: float | None, styles) -> None:
    is_eval = key.startswith("eval/")
    longest = max(len(r.series[key][0]) for _, runs in groups for r in runs if key in r.series)
    w = 0.0 if is_eval else default_weight(longest) if weight is None else weight
    for (name, runs), (color, dashes, marker) in zip(groups, styles):
        if not is_eval and w > 0 and len(runs) == 1 and key in runs[0].series:
            ax.plot(*runs[0].series[key], color=color, alpha=0.25, linewidth=0.8)
        steps, values = _stack(runs, key, w)
        if steps is None:
            continue
        ax.plot(steps, values.mean(0), color=color, linewidth=1.8, label=name, linestyle=dashes,
                marker=marker if is_eval or len(steps) < 3 else None, markersize=5)
        if len(runs) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel(LABELS.get(key, key))
    ax.set_title(LABELS.get(key, key) + ("" if is_eval or w == 0 else f" (smoothed, w={w:g})"))
    if key.endswith("loss") or key in ("eval/fid", "eval/sfid", "eval/digits_fd"):
        _log_scale_if_wide(ax)  # distances too fall by orders of magnitude
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(True, alpha=0.3)


def _draw_loss_by_bucket(ax, groups, weight: float | None, styles) -> None:
    last = 0
    for (name, runs), (color, dashes, marker) in zip(groups, styles):
        keys = sorted({k for r in runs for k in r.series if BUCKET.match(k)},
                      key=lambda k: int(BUCKET.match(k).group(1)))
        if not keys:
            continue
        num = int(BUCKET.match(keys[-1]).group(1)) + 1
        ks, finals = [], []
        for key in keys:
            vals = [smooth(v, default_weight(len(v)) if weight is None else weight)[-1]
                    for r in runs if key in r.series for v in [r.series[key][1]]]
            ks.append(int(BUCKET.match(key).group(1)))
            finals.append(np.mean(vals))
        ax.plot((np.array(ks) + 0.5) / num, finals, color=color, marker=marker, linewidth=1.8,
                linestyle=dashes, label=name)
        last = max([last] + [int(r.series[k][0][-1]) for r in runs for k in keys
                             if k in r.series])
    ax.set_xlim(0, 1)
    ax.set_xlabel("timestep t/T (centre of each bucket)")
    ax.set_ylabel("loss in the bucket")
    _log_scale_if_wide(ax)  # the loss of small t can be orders of magnitude below large t
    ax.set_title(f"loss per timestep bucket at step {last:,}")
    ax.grid(True, alpha=0.3)


def plot_runs(run_dirs: list[str], metrics: list[str] | None = None, names: list[str] | None = None,
              smoothing: float | None = None, title: str = ""):
    """The figure of `metrics` (default: loss, loss_t and every eval metric present) of the runs;
    one panel per metric, one colour per run (or seed group), one legend of run names."""
    if not run_dirs:
        raise UserError("no RUN_DIR given; pass one or more training workdirs.")
    if smoothing is not None and not 0 <= smoothing < 1:
        raise UserError(f"--smoothing={smoothing} is outside [0, 1); use e.g. 0.6 (0 = none).")
    names = names or run_names(run_dirs)
    if len(names) != len(run_dirs):
        raise UserError(f"--names gives {len(names)} names for {len(run_dirs)} runs; give one "
                        "per RUN_DIR.")
    runs = [Run(n, read_metrics(d)) for n, d in zip(names, run_dirs)]
    if metrics is None:
        have = set().union(*(r.series for r in runs))
        metrics = [m for m in ("loss", "loss_t", *[a for a in ALIASES if a != "loss"])
                   if (m == "loss_t" and any(BUCKET.match(k) for k in have))
                   or ALIASES.get(m) in have]
    keys = resolve_metrics(metrics, runs)
    groups = group_seeds(names, runs)
    cols = 2 if len(keys) == 4 else min(len(keys), 3)
    rows = -(-len(keys) // cols)
    fig = figures.new_figure(4.6 * cols, 3.4 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    # Colour, dashes and marker all differ between runs, so that coinciding lines stay visible.
    styles = [(f"C{i % 10}", ("-", "--", ":", "-.")[i % 4], "os^Dv<>p"[i % 8])
              for i in range(len(groups))]
    for ax, key in zip(axes, keys):
        if key == "loss_t":
            _draw_loss_by_bucket(ax, groups, smoothing, styles)
        else:
            _draw_over_steps(ax, groups, key, smoothing, styles)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=color, linestyle=dashes, marker=marker, linewidth=1.8,
                      label=name if len(g) == 1
                      else f"{name} (mean of {len(g)} seeds, range shaded)")
               for (name, g), (color, dashes, marker) in zip(groups, styles)]
    widest = max(len(h.get_label()) for h in handles) * 0.085 + 0.7  # inches at 10 pt
    fig.legend(handles=handles, loc="outside lower center", frameon=False,
               ncols=max(1, min(len(handles), int(fig.get_figwidth() / widest))))
    fig.suptitle(title or "runs: " + ", ".join(name for name, _ in groups), fontsize=11)
    return fig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m switch_dit_jax.analysis.curves",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training workdirs")
    p.add_argument("--metric", default="",
                   help="comma-separated metrics (default: loss, loss_t and every eval metric "
                        "the runs have)")
    p.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")
    p.add_argument("--smoothing", type=float, default=None,
                   help="EMA weight w in [0, 1) for training scalars, 0 = none (default: 0.6 "
                        "for series of at least 20 logged values, none for shorter ones)")
    p.add_argument("--names", default="", help="comma-separated legend names, one per RUN_DIR")
    p.add_argument("--title", default="", help="figure title (default: the run names)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] or None  # noqa: E731
    try:
        fig = plot_runs(args.run_dirs, split(args.metric), split(args.names), args.smoothing,
                        args.title)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    figures.save(fig, args.out)
    print(args.out)
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
