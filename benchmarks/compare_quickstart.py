"""DiT vs DTR vs Switch-DiT at the quickstart's scale: a toy look at the papers' convergence
claim (Switch-DiT Fig. 5, DTR Fig. 4), reported as measured, whatever it shows.

    python benchmarks/compare_quickstart.py --out_dir=runs/compare            # 3 x 3 runs
    python benchmarks/compare_quickstart.py --seeds=1 --steps=600 --eval_every=200

trains configs/quickstart.py (DiT), quickstart_dtr.py and quickstart_switchdit.py on the
embedded digits with one budget (the same steps, batch, learning rate, EMA decay and
evaluation schedule; only the routing differs), each with seeds 0..S-1 (`seed` and
`data.seed`), evaluating the EMA model every `--eval_every` steps (digits classifier accuracy
and FD of `--eval_samples` samples), then draws OUT_DIR/curves.png with
`switch_dit_jax.analysis.curves` (mean over the seeds, range shaded) and writes
OUT_DIR/summary.json (each model's last evaluation, mean and spread over the seeds, and wall
time per run). A finished run is not trained again, so an interrupted comparison resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from switch_dit_jax.analysis import curves, figures  # noqa: E402

CONFIGS = {"dit": "quickstart.py", "dtr": "quickstart_dtr.py",
           "switchdit": "quickstart_switchdit.py"}
METRICS = ("eval/digits_fd", "eval/digits_classifier_accuracy")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default=os.path.join(ROOT, "runs", "compare_quickstart"))
    p.add_argument("--models", default="dit,dtr,switchdit",
                   help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per model")
    p.add_argument("--steps", type=int, default=1500, help="training steps of every run")
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--eval_samples", type=int, default=100, help="samples per evaluation")
    p.add_argument("--ema_decay", type=float, default=0.995)
    args = p.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in CONFIGS]
    if unknown:
        p.error(f"--models has {', '.join(unknown)}; choose from {', '.join(CONFIGS)}.")
    if args.seeds < 1 or args.steps < 1 or not 0 < args.eval_every <= args.steps:
        p.error("--seeds and --steps must be >= 1 and --eval_every in [1, --steps].")
    return args


def train(model: str, seed: int, args, workdir: str) -> float | None:
    """Trains one run (resuming an unfinished one); its wall time in seconds as measured when it
    was trained (None if unknown)."""
    timing = os.path.join(workdir, "wall_seconds.txt")
    if os.path.isdir(os.path.join(workdir, "checkpoints", str(args.steps))):
        return float(open(timing).read()) if os.path.exists(timing) else None
    command = [sys.executable, "-m", "switch_dit_jax.main",
               f"--config={os.path.join(ROOT, 'configs', CONFIGS[model])}", f"--workdir={workdir}",
               f"--config.seed={seed}", f"--config.data.seed={seed}",
               f"--config.train.num_steps={args.steps}",
               f"--config.train.ema_decay={args.ema_decay}",
               f"--config.train.checkpoint_every={args.steps}",
               f"--config.train.sample_every={args.steps}",
               f"--config.eval.eval_every={args.eval_every}",
               f"--config.eval.num_samples={args.eval_samples}"]
    start = time.monotonic()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=log,
                       stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    with open(timing, "w", encoding="utf-8") as f:
        f.write(f"{seconds:.1f}\n")
    return seconds


def last_evaluation(workdir: str) -> dict[str, float]:
    """The run's last evaluation: its step and METRICS."""
    series = curves.read_metrics(workdir)
    found = {k: series[k] for k in METRICS if k in series}
    if not found:
        return {}
    step = int(next(iter(found.values()))[0][-1])
    return {"eval_step": step, **{k: float(v[1][-1]) for k, v in found.items()}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    models = args.models.split(",")
    summary = {"steps": args.steps, "seeds": args.seeds, "eval_every": args.eval_every,
               "eval_samples": args.eval_samples, "ema_decay": args.ema_decay, "models": {}}
    run_dirs = []
    for model in models:
        runs = []
        for seed in range(args.seeds):
            workdir = os.path.join(args.out_dir, model, f"seed{seed}")
            seconds = train(model, seed, args, workdir)
            print(f"{model} seed {seed}: "
                  + (f"{seconds:.0f} s" if seconds is not None else "done before"), flush=True)
            runs.append({"seed": seed, "wall_s": seconds, **last_evaluation(workdir)})
            run_dirs.append(workdir)
        entry = {"runs": runs}
        for key in METRICS:
            values = [r[key] for r in runs if key in r]
            if values:
                name = key.split("/")[-1]
                entry[f"{name}_mean"] = float(np.mean(values))
                entry[f"{name}_min_max"] = [min(values), max(values)]
        summary["models"][model] = entry
    # diffusion_loss, not loss: Switch-DiT's loss also holds lambda_dp times its prior loss.
    figure = curves.plot_runs(run_dirs, ["fd", "accuracy", "diffusion_loss"], title=(
        f"DiT vs DTR vs Switch-DiT on the digits: {args.steps} steps, {args.seeds} seed(s), "
        f"{args.eval_samples} samples per evaluation"))
    figures.save(figure, os.path.join(args.out_dir, "curves.png"))
    with open(os.path.join(args.out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print("| model | digits FD, last evaluation, per seed | accuracy | wall s per run |")
    print("|---|---|---|---|")
    for model, s in summary["models"].items():
        fd = [r.get("eval/digits_fd", float("nan")) for r in s["runs"]]
        acc = [r.get("eval/digits_classifier_accuracy", float("nan")) for r in s["runs"]]
        walls = [r["wall_s"] if r["wall_s"] is not None else float("nan") for r in s["runs"]]
        print(f"| {model} | {' / '.join(f'{v:.2f}' for v in fd)} | "
              f"{' / '.join(f'{v:.2f}' for v in acc)} | {' / '.join(f'{w:.0f}' for w in walls)} |")
    print(os.path.join(args.out_dir, "curves.png"))
    return summary


if __name__ == "__main__":
    main()
