"""Steady-state training throughput of a config's compiled train step on the present devices.

    python benchmarks/train_throughput.py --config=configs/dit_b.py \
        --config.model.compute_dtype=bfloat16 [--windows=5 --steps_per_window=10]

Synthetic data (the data pipeline is not measured). Reports images/s (median of several timed
windows after warm-up), peak device memory, and model FLOPs utilisation: the analytic model
FLOPs of a step (switch_dit_jax/models/flops.py: 3 × forward matmul FLOPs, activated experts
only), shown next to XLA's cost analysis of the compiled step, over the device's peak dense
FLOP/s (`flops.PEAK_FLOPS`; none for CPUs, whose peak depends on the part).
"""
from __future__ import annotations

import json
import resource
import statistics
import time

import flax.linen as nn
import jax
from absl import app, flags
from ml_collections import config_flags

from switch_dit_jax import cpu_tuning, parallel
from switch_dit_jax.models import flops as flops_lib
from switch_dit_jax.train.state import count_params
from synthetic_step import synthetic_step

config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_integer("warmup_steps", 3, "Steps before timing (after compilation).")
flags.DEFINE_integer("windows", 5, "Timed windows; the median is reported.")
flags.DEFINE_integer("steps_per_window", 10, "Steps per timed window.")
flags.DEFINE_string("out", "", "Optional path of a JSON file for the result.")
FLAGS = flags.FLAGS


def step_flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def peak_memory_bytes(device) -> tuple[int, str]:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def main(argv):
    del argv
    config = FLAGS.config
    step, state, batch, key, mesh, model = synthetic_step(config)
    b = config.train.global_batch_size
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        t0 = time.perf_counter()
        compiled = cpu_tuning.compile_step(step.lower(state, batch, key))
        compile_s = time.perf_counter() - t0
        for _ in range(FLAGS.warmup_steps):
            state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics)
        window_s = []
        for _ in range(FLAGS.windows):
            t0 = time.perf_counter()
            for _ in range(FLAGS.steps_per_window):
                state, metrics = compiled(state, batch, key)
            jax.block_until_ready(metrics)
            window_s.append(time.perf_counter() - t0)

    device = jax.devices()[0]
    step_s = statistics.median(window_s) / FLAGS.steps_per_window
    xla_flops = step_flops(compiled)
    flops = flops_lib.train_flops_per_step(model, b)
    kind = getattr(device, "device_kind", device.platform)
    mfu = flops_lib.mfu(flops / step_s, kind, config.model.compute_dtype, jax.device_count())
    memory, memory_kind = peak_memory_bytes(device)
    result = {
        "model": config.model.name, "compute_dtype": config.model.compute_dtype,
        "global_batch_size": b, "devices": jax.device_count(),
        "device_kind": kind,
        "params": count_params(state.params), "compile_s": round(compile_s, 2),
        "step_ms_median": round(step_s * 1e3, 3),
        "images_per_s_median": round(b / step_s, 2),
        "step_ms_windows": [round(w / FLAGS.steps_per_window * 1e3, 3) for w in window_s],
        "model_gflops_per_image_forward": round(
            flops_lib.forward_macs_per_image(model)["total"] / 1e9, 3),  # DiT paper's column
        "tflops_per_step": round(flops / 1e12, 4),
        "xla_tflops_per_step": round(xla_flops / 1e12, 4) if xla_flops else None,
        "achieved_tflops_per_s": round(flops / step_s / 1e12, 4),
        "mfu": round(mfu, 4) if mfu is not None else None,
        "peak_memory_gib": round(memory / 2 ** 30, 3), "peak_memory_kind": memory_kind,
    }
    print(json.dumps(result, indent=1))
    if FLAGS.out:
        with open(FLAGS.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
