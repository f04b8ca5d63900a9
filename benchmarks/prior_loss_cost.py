"""What the Switch-DiT diffusion prior loss costs per training step.

    python benchmarks/prior_loss_cost.py --config=configs/quickstart.py \
        --config.model.routing.kind=switch [--windows=5 --steps_per_window=10]

1. The exact assignment alone on N·M x N·M cost matrices of Switch-DiT-S/B (36), L (72) and
   XL (84): the on-device JAX solver the step uses (models/assignment.py, jitted) next to
   scipy's Jonker-Volgenant called the way the step used to call it (a jax.pure_callback
   inside jit, host round trip included) and called directly on the host; three kinds of cost
   (an untrained router's random top-k map and a trained one's, both against the shuffled
   prior map as the loss builds them, and uniform integers in [0, T]); medians of 200 calls,
   the three solvers interleaved.
2. A/B in one process: the compiled train step of the given config with the prior loss on
   (loss.prior_weight=1) and off (0), interleaved timed windows, median step time of each.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from scipy.optimize import linear_sum_assignment

from switch_dit_jax.models import build_model, switch
from synthetic_step import synthetic_step

config_flags.DEFINE_config_file("config", None, "Config file (a Switch-DiT model).",
                                lock_config=False)
flags.DEFINE_integer("windows", 9, "Timed windows per variant.")
flags.DEFINE_integer("steps_per_window", 10, "Steps per window.")
FLAGS = flags.FLAGS


def scipy_assignment(cost: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(np.asarray(cost, np.float64))
    out = np.empty(len(rows), np.int32)
    out[rows] = cols
    return out


def scipy_in_jit(cost: jax.Array) -> jax.Array:
    """The pre-JAX-solver path: scipy on the host, called back from the jitted step."""
    return jax.pure_callback(scipy_assignment, jax.ShapeDtypeStruct(cost.shape[:1], jnp.int32),
                             cost)


def cost_matrices(n: int, num_tasks: int = 1000) -> dict:
    rng = np.random.default_rng(n)
    depth = n // 3
    prior = switch.prior_activation_map(depth, 3, 2, num_tasks)
    probs = rng.random((num_tasks, depth, 3)).astype(np.float32)
    untrained = switch.gate_activation_map(jnp.asarray(probs), 2)
    trained = prior[:, rng.permutation(n)]
    shuffled_prior = jnp.asarray(prior[:, rng.permutation(n)])
    return {"untrained_router": switch.matching_cost(untrained, shuffled_prior),
            "trained_router": switch.matching_cost(jnp.asarray(trained), shuffled_prior),
            "uniform_0_T": jnp.asarray(rng.integers(0, num_tasks + 1, (n, n)), jnp.float32)}


def assignment_ms(n: int, repeats: int = 200) -> dict:
    solvers = {"jax_ms": jax.jit(switch.optimal_assignment), "scipy_callback_ms":
               jax.jit(scipy_in_jit), "scipy_host_ms": lambda c: scipy_assignment(np.asarray(c))}
    result = {}
    for kind, cost in cost_matrices(n).items():
        cost = jax.block_until_ready(cost)
        c = np.asarray(cost, np.float64)
        totals = {name: c[np.arange(n), np.asarray(f(cost))].sum()  # also compiles
                  for name, f in solvers.items()}
        if len(set(totals.values())) != 1:
            raise SystemExit(f"error: the solvers disagree on the optimal cost: {totals}")
        times = {name: [] for name in solvers}
        for _ in range(repeats):
            for name, f in solvers.items():  # interleaved so that drift hits all alike
                t0 = time.perf_counter()
                jax.block_until_ready(f(cost))
                times[name].append(time.perf_counter() - t0)
        result[kind] = {name: round(statistics.median(t) * 1e3, 4) for name, t in times.items()}
    return result


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
    result = {"assignment_ms_median": {str(n): assignment_ms(n) for n in (36, 72, 84)}}
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
        "cpu_count": os.cpu_count(),
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
