"""What the Switch-DiT diffusion prior loss costs per training step.

    python benchmarks/prior_loss_cost.py --config=configs/quickstart.py \
        --config.model.routing.kind=switch [--windows=5 --steps_per_window=10]

1. The exact assignment alone (scipy's Jonker-Volgenant on the host, what the step calls back
   to) on N·M x N·M cost matrices of Switch-DiT-S/B (36), L (72) and XL (84), median of 200.
2. A/B in one process: the compiled train step of the given config with the prior loss on
   (loss.prior_weight=1) and off (0), interleaved timed windows, median step time of each.
"""
from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from switch_dit_jax.models import build_model, switch
from synthetic_step import synthetic_step

config_flags.DEFINE_config_file("config", None, "Config file (a Switch-DiT model).",
                                lock_config=False)
flags.DEFINE_integer("windows", 9, "Timed windows per variant.")
flags.DEFINE_integer("steps_per_window", 10, "Steps per window.")
FLAGS = flags.FLAGS


def assignment_seconds(n: int, repeats: int = 200) -> float:
    rng = np.random.default_rng(0)
    cost = rng.integers(0, 2000, (n, n)).astype(np.float32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        switch._assignment_host(cost)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compiled_step(config, prior_weight: float):
    config = config.copy_and_resolve_references()
    config.loss.prior_weight = prior_weight
    fn, state, batch, key, _, _ = synthetic_step(config)
    state, metrics = fn(state, batch, key)  # compile + warm up
    jax.block_until_ready(metrics)
    return fn, state, batch, key


def main(argv):
    del argv
    config = FLAGS.config
    if config.model.routing.kind != "switch":
        raise SystemExit("error: pass a Switch-DiT config (--config.model.routing.kind=switch).")
    result = {"assignment_ms_median": {str(n): round(assignment_seconds(n) * 1e3, 4)
                                       for n in (36, 72, 84)}}
    variants = {w: list(compiled_step(config, w)) for w in (1.0, 0.0)}
    times = {w: [] for w in variants}
    for _ in range(FLAGS.windows):
        for w, v in variants.items():  # interleaved so that drift hits both alike
            fn, state, batch, key = v
            t0 = time.perf_counter()
            for _ in range(FLAGS.steps_per_window):
                state, metrics = fn(state, batch, key)
            jax.block_until_ready(metrics)
            times[w].append((time.perf_counter() - t0) / FLAGS.steps_per_window)
            v[1] = state
    on, off = statistics.median(times[1.0]), statistics.median(times[0.0])
    result.update({
        "device": getattr(jax.devices()[0], "device_kind", jax.devices()[0].platform),
        "model": f"{config.model.name} depth={build_model(config.model).depth}",
        "global_batch_size": config.train.global_batch_size,
        "step_ms_with_prior": round(on * 1e3, 3), "step_ms_without_prior": round(off * 1e3, 3),
        "prior_overhead_ms": round((on - off) * 1e3, 3),
        "prior_overhead_fraction": round((on - off) / off, 4),
        # Minimums are the least disturbed by other load on the machine.
        "step_ms_min_with_prior": round(min(times[1.0]) * 1e3, 3),
        "step_ms_min_without_prior": round(min(times[0.0]) * 1e3, 3),
        "step_ms_windows_with_prior": [round(x * 1e3, 2) for x in times[1.0]],
        "step_ms_windows_without_prior": [round(x * 1e3, 2) for x in times[0.0]],
    })
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
