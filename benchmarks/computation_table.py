"""The computation columns of DTR Table 7 and Switch-DiT Table 2, on the machine it runs on.

    python benchmarks/computation_table.py                       # S, B, L at batch 256 (GPU)
    python benchmarks/computation_table.py --sizes=S --batch=4 --steps=3   # a few CPU minutes
    python benchmarks/computation_table.py --methods=adm,adm_dtr --batch=2 --steps=1  # ADM-64

For DiT, DiT + DTR and Switch-DiT at each size: parameters, GFLOPs per image (one forward pass
of a 256x256 image's 32x32x4 latent, matmul multiply-accumulates: the DiT paper's convention,
from switch_dit_jax/models/flops.py) and training iterations per second of the compiled train
step (synthetic batch, median of timed windows after warm-up; data loading not included),
next to the papers' numbers. `adm` and `adm_dtr` are ADM's ImageNet 64x64 UNet (configs/
adm_imagenet64.py, 64x64x3 pixels; one row each, whatever --sizes), counted as
models/flops.py describes (3x3 convolutions as 9·C_in·C_out per output pixel); the DTR paper
reports no GFLOPs for ADM. The papers timed batch 256 on their GPUs; iterations/s from
another batch or machine compare methods with each other, not with the papers.

Switch-DiT's GFLOPs differ from the paper's because the computation differs: the official
code runs each token through its k = 2 chosen mask experts (2·S·D² per block); this package
mixes the experts' weights per sample first (M·D² + S·D² per block, models/switch.py).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
from absl import app, flags

from switch_dit_jax import config_base, config_recipes, cpu_tuning, parallel
from switch_dit_jax.models import flops as flops_lib
from switch_dit_jax.train.state import count_params
from synthetic_step import synthetic_step

flags.DEFINE_list("sizes", ["S", "B", "L"], "DiT sizes (S, B, L, XL), patch 2.")
flags.DEFINE_list("methods", ["dit", "dtr", "switch"],
                  "Methods: dit, dtr, switch (per size); adm, adm_dtr (ADM ImageNet-64).")
flags.DEFINE_integer("batch", 256, "Global batch size of the timed train step.")
flags.DEFINE_integer("warmup", 2, "Steps after compilation before timing.")
flags.DEFINE_integer("windows", 3, "Timed windows; the median is reported.")
flags.DEFINE_integer("steps", 5, "Steps per timed window.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Matmul dtype.")
flags.DEFINE_string("out", "", "Optional path of a JSON file for the rows.")
FLAGS = flags.FLAGS

METHOD_NAMES = {"dit": "DiT-{}/2", "dtr": "DiT-{}/2 + DTR", "switch": "Switch-DiT-{}",
                "adm": "ADM-64", "adm_dtr": "ADM-64 + DTR"}
ADM_METHODS = ("adm", "adm_dtr")
# (GFLOPs, iterations/s) of DTR Table 7 (S, B, L) and GFLOPs of Switch-DiT Table 2 (S, B, XL).
PAPER = {
    ("dit", "S"): (6.06, 8.19), ("dtr", "S"): (6.06, 8.14), ("switch", "S"): (6.74, None),
    ("dit", "B"): (23.01, 6.90), ("dtr", "B"): (23.02, 6.87), ("switch", "B"): (26.55, None),
    ("dit", "L"): (80.71, 3.72), ("dtr", "L"): (80.73, 3.71),
    ("dit", "XL"): (118.64, None), ("dtr", "XL"): (118.69, None),
    ("switch", "XL"): (132.72, None),
}


def method_config(method: str, size: str):
    name = f"DiT-{size}/2"
    if method == "dtr":
        c = config_recipes.dtr_config(name)
    elif method == "switch":
        c = config_recipes.switchdit_config(name)
    elif method in ADM_METHODS:
        c = config_recipes.adm_imagenet64_unet(
            config_recipes.adm_pixel_config("dtr" if method == "adm_dtr" else ""))
        c.model.num_classes = 1000
    elif method == "dit":
        c = config_base.get_base_config()
        c.model.name = name
    else:
        raise ValueError(f"--methods has {method!r}; use dit, dtr, switch, adm or adm_dtr.")
    c.model.compute_dtype = FLAGS.compute_dtype
    c.train.global_batch_size = FLAGS.batch
    return c


def machine() -> str:
    """The CPU model and core count, the accelerators, and the load (a shared host is slow)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return (f"{jax.device_count()} x {kind} ({device.platform}); host {cpu}, "
            f"{os.cpu_count()} cores{load}; jax {jax.__version__}")


def measure(config) -> dict:
    step, state, batch, key, mesh, model = synthetic_step(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        compiled = cpu_tuning.compile_step(step.lower(state, batch, key))
        for _ in range(FLAGS.warmup):
            state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics)
        windows = []
        for _ in range(FLAGS.windows):
            t0 = time.perf_counter()
            for _ in range(FLAGS.steps):
                state, metrics = compiled(state, batch, key)
            jax.block_until_ready(metrics)
            windows.append((time.perf_counter() - t0) / FLAGS.steps)
    return {"params_m": count_params(state.params) / 1e6,
            "gflops": flops_lib.forward_macs_per_image(model)["total"] / 1e9,
            "iters_per_s": 1.0 / statistics.median(windows)}


def main(argv):
    del argv
    rows = []
    header = (f"{'method':<18} {'params':>8} {'GFLOPs':>8} {'paper':>7} "
              f"{'iters/s':>8} {'paper':>6}")
    print(f"machine: {machine()}")
    print(f"train step: batch {FLAGS.batch}, {FLAGS.compute_dtype}, 32x32x4 latents (ADM: "
          f"64x64x3 pixels), median of {FLAGS.windows} x {FLAGS.steps} steps")
    print(header)
    dit_methods = [m for m in FLAGS.methods if m not in ADM_METHODS]
    runs = [(size, m) for size in FLAGS.sizes for m in dit_methods]
    runs += [("", m) for m in FLAGS.methods if m in ADM_METHODS]
    for size, method in runs:
        row = {"method": METHOD_NAMES[method].format(size), **measure(
            method_config(method, size))}
        paper_gflops, paper_iters = PAPER.get((method, size), (None, None))
        row.update(paper_gflops=paper_gflops, paper_iters_per_s=paper_iters)
        rows.append(row)
        print(f"{row['method']:<18} {row['params_m']:>7.1f}M {row['gflops']:>8.2f} "
              f"{paper_gflops if paper_gflops else '-':>7} {row['iters_per_s']:>8.3f} "
              f"{paper_iters if paper_iters else '-':>6}", flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w", encoding="utf-8") as f:
            json.dump({"machine": machine(), "batch": FLAGS.batch, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
