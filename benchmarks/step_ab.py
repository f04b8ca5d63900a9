"""Train-step time of several configs, interleaved in one process (A/B/...), as ratios.

    python benchmarks/step_ab.py --configs=configs/dit_s.py,configs/dtr_s.py,configs/switchdit_s.py \
        --batch=8 [--rounds=4 --steps=3] [--set=model.compute_dtype=bfloat16]

Each config's jitted step is compiled first; then every round times `--steps` steps of each
config in turn, so that slow drifts of the machine hit all of them alike. Reported: the median
step time of each, and its ratio to the first config's (images/s ratio = 1 / that). Synthetic
data, one fixed batch (the data pipeline is not measured).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_step import synthetic_step  # noqa: E402

from switch_dit_jax import cpu_tuning, parallel  # noqa: E402
from switch_dit_jax.config_base import load_config  # noqa: E402

flags.DEFINE_list("configs", None, "Config files (path[:arg]), the first is the reference.")
flags.DEFINE_integer("batch", 8, "Global batch size.")
flags.DEFINE_integer("rounds", 4, "Interleaved rounds.")
flags.DEFINE_integer("steps", 3, "Timed steps per config and round.")
flags.DEFINE_multi_string("set", [], "Overrides for every config, field=value (Python literal).")
flags.DEFINE_string("out", "", "Optional JSON file for the result.")
FLAGS = flags.FLAGS


def parse_override(text: str):
    import ast
    field, _, value = text.partition("=")
    try:
        return field, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return field, value


def main(argv):
    del argv
    overrides = dict(parse_override(s) for s in FLAGS.set)
    overrides["train.global_batch_size"] = FLAGS.batch
    runs = {}
    for path in FLAGS.configs:
        config = load_config(path, overrides)
        fn, state, data, key, mesh, _ = synthetic_step(config)
        with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
            compiled = cpu_tuning.compile_step(fn.lower(state, data, key))
            state, metrics = compiled(state, data, key)
            jax.block_until_ready(metrics)
        runs[path] = {"step": compiled, "state": state, "data": data, "key": key,
                      "mesh": mesh, "times": []}
    for _ in range(FLAGS.rounds):
        for run in runs.values():
            with jax.set_mesh(run["mesh"]), nn.logical_axis_rules(parallel.LOGICAL_RULES):
                for _ in range(FLAGS.steps):
                    t0 = time.perf_counter()
                    run["state"], metrics = run["step"](run["state"], run["data"], run["key"])
                    jax.block_until_ready(metrics)
                    run["times"].append(time.perf_counter() - t0)
    ref = statistics.median(runs[FLAGS.configs[0]]["times"])
    result = {"device": getattr(jax.devices()[0], "device_kind", jax.default_backend()),
              "batch": FLAGS.batch, "overrides": {k: str(v) for k, v in overrides.items()},
              "configs": {}}
    for path, run in runs.items():
        med = statistics.median(run["times"])
        result["configs"][path] = {"step_s_median": round(med, 4),
                                   "step_s_min": round(min(run["times"]), 4),
                                   "ratio_to_first": round(med / ref, 4)}
        print(f"{path:40s} {med:8.3f} s/step (min {min(run['times']):.3f})  "
              f"x{med / ref:.3f} of {FLAGS.configs[0]}")
    print(json.dumps(result, indent=1))
    if FLAGS.out:
        with open(FLAGS.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    flags.mark_flag_as_required("configs")
    app.run(main)
