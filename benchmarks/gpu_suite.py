"""The README's GPU rows in one run (see gpu_suite.sh, which calls this).

    python benchmarks/gpu_suite.py [--smoke] [--out=suite.json]

On one H100/H200 (about 8 minutes in all):
1. Train throughput, memory and MFU of DiT-XL/2, DTR-XL/2, Switch-DiT-XL/2 and DiffMoE-L-E16
   in bfloat16 with model.attention_impl="auto" (cuDNN flash attention), each at the largest
   per-device batch of 256, 128, 64, 32 that fits: a batch whose compiled step needs more
   memory than the device has (XLA's memory analysis), or that runs out of memory, is
   dropped for the next one.
2. DiT-XL/2 sampling throughput: 250 DDPM steps with classifier-free guidance.
3. Two checks: the bfloat16 and float32 losses of DiT-XL/2 on the same batch and weights,
   and cuDNN against XLA attention outputs on DiT-XL/2's shapes.

`--smoke` runs the same code paths with tiny models on the CPU in well under two minutes
(tests/test_gpu_suite.py runs it); there the memory limit is simulated so that the fallback
to a smaller batch runs too, and the cuDNN check reports that it needs a GPU.

Needs only the packages in NEEDS (no grain, clu, orbax or TensorFlow) and no install of this
package (gpu_suite.sh puts the checkout on PYTHONPATH), so that it runs on a bare GPU image
with ml_collections carried as a wheel; a missing one is named before anything runs.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

# What the suite imports beyond the standard library (pip names), checked before any work.
NEEDS = {"jax": "jax", "absl": "absl-py", "flax": "flax", "ml_collections": "ml-collections",
         "numpy": "numpy", "optax": "optax", "PIL": "pillow", "yaml": "pyyaml"}


def missing_packages() -> list[str]:
    import importlib.util
    return [pip for module, pip in NEEDS.items() if importlib.util.find_spec(module) is None]


if __name__ == "__main__" and missing_packages():  # one sentence, not an ImportError traceback
    _missing = " ".join(missing_packages())
    sys.exit(f"gpu_suite: {_missing} not installed: pip install {_missing} (without internet, "
             "carry the wheels: see the README's Speed section).")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(HERE)

flags.DEFINE_bool("smoke", False, "Tiny models on any backend (the CPU test of this suite).")
flags.DEFINE_string("out", "", "Optional JSON file for the results.")
flags.DEFINE_string("only", "", "Comma-separated subset of: train,sample,checks.")
FLAGS = flags.FLAGS

TRAIN_MODELS = (  # (row name, config file)
    ("DiT-XL/2", "dit_xl.py"),
    ("DTR-XL/2", "dtr_xl.py"),
    ("Switch-DiT-XL/2", "switchdit_xl.py"),
    ("DiffMoE-L-E16", "diffmoe_l_e16.py"),
)
BATCHES = (256, 128, 64, 32)
TINY = {"model.name": "custom", "model.depth": 2, "model.hidden_size": 64,
        "model.num_heads": 4, "model.patch_size": 2, "model.input_size": 8}
SMOKE_BATCHES = (16, 8)
SMOKE_MEMORY_LIMIT_BATCH = 8  # the simulated device holds at most this batch


class DoesNotFit(Exception):
    pass


def load(config_file: str, overrides: dict):
    from switch_dit_jax.config_base import load_config
    return load_config(os.path.join(ROOT, "configs", config_file), overrides)


def device_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def compiled_step(config, batch: int):
    """The compiled train step at `batch`, or DoesNotFit."""
    import flax.linen as nn
    from switch_dit_jax import cpu_tuning, parallel
    from synthetic_step import synthetic_step
    if FLAGS.smoke and batch > SMOKE_MEMORY_LIMIT_BATCH:
        raise DoesNotFit(f"batch {batch} exceeds the smoke run's simulated memory")
    config.train.global_batch_size = batch * jax.device_count()
    fn, state, data, key, mesh, model = synthetic_step(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        t0 = time.perf_counter()
        compiled = cpu_tuning.compile_step(fn.lower(state, data, key))
        compile_s = time.perf_counter() - t0
    need = compiled.memory_analysis()
    limit = device_memory_bytes()
    if need is not None and limit:
        total = (need.temp_size_in_bytes + need.argument_size_in_bytes
                 + need.output_size_in_bytes - need.alias_size_in_bytes)
        if total > 0.97 * limit:
            raise DoesNotFit(f"batch {batch} needs {total / 2**30:.1f} GiB of "
                             f"{limit / 2**30:.1f} GiB")
    return compiled, state, data, key, mesh, model, compile_s


def time_steps(compiled, state, data, key, mesh, windows: int, steps: int) -> list[float]:
    import flax.linen as nn
    from switch_dit_jax import parallel
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        for _ in range(2):
            state, metrics = compiled(state, data, key)
        jax.block_until_ready(metrics)
        out = []
        for _ in range(windows):
            t0 = time.perf_counter()
            for _ in range(steps):
                state, metrics = compiled(state, data, key)
            jax.block_until_ready(metrics)
            out.append((time.perf_counter() - t0) / steps)
    return out


def train_row(name: str, config_file: str) -> dict:
    from switch_dit_jax.models import flops
    overrides = {"model.compute_dtype": "bfloat16", "model.attention_impl": "auto"}
    if FLAGS.smoke:
        overrides.update(TINY)
    config = load(config_file, overrides)
    tried = []
    for batch in SMOKE_BATCHES if FLAGS.smoke else BATCHES:
        try:
            compiled, state, data, key, mesh, model, compile_s = compiled_step(config, batch)
            windows = time_steps(compiled, state, data, key, mesh, *((1, 2) if FLAGS.smoke
                                                                     else (3, 5)))
            break
        except DoesNotFit as e:
            tried.append(str(e))
        except Exception as e:  # noqa: BLE001 -- an out-of-memory at run time
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            tried.append(f"batch {batch}: out of memory")
    else:
        return {"model": name, "error": "no batch fits: " + "; ".join(tried)}
    step_s = statistics.median(windows)
    global_batch = batch * jax.device_count()
    train_flops = flops.train_flops_per_step(model, global_batch)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    mfu = flops.mfu(train_flops / step_s, device.device_kind, "bfloat16", jax.device_count())
    if FLAGS.smoke:
        name += " (smoke: tiny)"
    return {"model": name, "per_device_batch": batch, "skipped_batches": tried,
            "attention_impl": model.attention_impl, "compile_s": round(compile_s, 1),
            "step_ms": round(step_s * 1e3, 2), "images_per_s": round(global_batch / step_s, 1),
            "images_per_s_per_device": round(batch / step_s, 1),
            "tflops_per_s": round(train_flops / step_s / 1e12, 1),
            "mfu": None if mfu is None else round(mfu, 4),
            "peak_memory_gib": round(stats["peak_bytes_in_use"] / 2**30, 2)
            if "peak_bytes_in_use" in stats else None}


def sampling_row() -> dict:
    import flax.linen as nn
    from switch_dit_jax import parallel
    from switch_dit_jax.models import build_model, flops
    from switch_dit_jax.sample import make_sample_fn
    from switch_dit_jax.train.state import create_train_state, make_optimizer
    steps, batch = (5, 4) if FLAGS.smoke else (250, 64)
    overrides = {"model.compute_dtype": "bfloat16", "sample.num_steps": steps,
                 "sample.cfg_scale": 1.5, "sample.sampler": "ddpm"}
    if FLAGS.smoke:
        overrides.update(TINY)
    config = load("dit_xl.py", overrides)
    mesh = parallel.make_mesh(config.mesh)
    model = build_model(config.model)
    state = create_train_state(model, make_optimizer(config.train), jax.random.PRNGKey(0), mesh)
    labels = jnp.arange(batch, dtype=jnp.int32) % model.num_classes
    fn = jax.jit(make_sample_fn(model, config))
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        t0 = time.perf_counter()
        compiled = fn.lower(state.ema_params, state.ema_model_state, labels,
                            jax.random.PRNGKey(1)).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(state.ema_params, state.ema_model_state, labels,
                                       jax.random.PRNGKey(1)))
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state.ema_params, state.ema_model_state, labels,
                                       jax.random.PRNGKey(2)))
        seconds = time.perf_counter() - t0
    sample_flops = flops.sample_flops_per_image(model, steps, cfg=True) * batch
    device = jax.devices()[0]
    mfu = flops.mfu(sample_flops / seconds, device.device_kind, "bfloat16", jax.device_count())
    return {"model": "DiT-XL/2 sampling", "steps": steps, "cfg_scale": 1.5, "batch": batch,
            "compile_s": round(compile_s, 1), "seconds_per_batch": round(seconds, 2),
            "images_per_s": round(batch / seconds, 2),
            "mfu": None if mfu is None else round(mfu, 4)}


def dtype_check() -> dict:
    """Relative difference of the bf16 and f32 diffusion losses on the same batch."""
    from switch_dit_jax.models import build_model
    from switch_dit_jax.train.step import make_diffusion
    overrides = dict(TINY) if FLAGS.smoke else {}
    config = load("dit_xl.py", overrides)
    m32 = build_model(config.model)
    m16 = build_model(dict(config.model, compute_dtype="bfloat16"))
    diffusion = make_diffusion(config)
    rng = np.random.default_rng(0)
    b, s, c = 8, m32.input_size, m32.in_channels
    x = jnp.asarray(rng.standard_normal((b, s, s, c)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((b, s, s, c)), jnp.float32)
    t = jnp.asarray(rng.integers(0, diffusion.num_timesteps, b))
    y = jnp.asarray(rng.integers(0, m32.num_classes, b), jnp.int32)
    params = m32.init(jax.random.PRNGKey(0), x, t, y)["params"]
    # A trained network's adaLN and output layers are not zero: perturb every weight so
    # that the loss depends on the whole network, as it does after training.
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(3), p.shape,
                                                                 p.dtype), params)

    def loss(model):
        def fn(p):
            out = diffusion.training_losses(lambda xt, tt: model.apply({"params": p}, xt, tt, y),
                                            x, t, noise)
            return jnp.mean(out["mse"] + out["vb"])
        return float(jax.jit(fn)(params))

    l32, l16 = loss(m32), loss(m16)
    rel = abs(l16 - l32) / abs(l32)
    # bf16 keeps 8 mantissa bits; with f32 accumulation and f32 norms the loss agrees to ~1e-3.
    return {"check": "bf16 vs f32 loss", "loss_float32": l32, "loss_bfloat16": l16,
            "relative_difference": rel, "ok": rel < 2e-2}


def attention_check() -> dict:
    """cuDNN flash attention against the XLA kernel on DiT-XL/2's shapes (bfloat16)."""
    from switch_dit_jax.models.attention import multi_head_attention
    b, s, h, d = (2, 16, 4, 16) if FLAGS.smoke else (32, 256, 16, 72)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.bfloat16) for _ in range(3))
    xla = np.asarray(jax.jit(lambda *a: multi_head_attention(*a, "xla"))(q, k, v), np.float32)
    row = {"check": "cuDNN vs XLA attention", "shape": [b, s, h, d]}
    if jax.default_backend() != "gpu":
        ref = np.asarray(jax.nn.dot_product_attention(q, k, v, implementation="xla"), np.float32)
        row.update(skipped="cuDNN needs a GPU; XLA kernel vs jax.nn.dot_product_attention",
                   max_abs_difference=float(np.abs(xla - ref).max()))
        row["ok"] = row["max_abs_difference"] <= 2e-2 * float(np.abs(ref).max())
        return row
    cudnn = np.asarray(jax.jit(lambda *a: multi_head_attention(*a, "cudnn"))(q, k, v),
                       np.float32)
    row["max_abs_difference"] = float(np.abs(cudnn - xla).max())
    row["max_abs_output"] = float(np.abs(xla).max())
    row["ok"] = row["max_abs_difference"] <= 2e-2 * row["max_abs_output"]  # bf16 rounding
    return row


def main(argv):
    del argv
    parts = set(FLAGS.only.split(",")) if FLAGS.only else {"train", "sample", "checks"}
    device = jax.devices()[0]
    result = {"device": f"{jax.device_count()} x {device.device_kind}", "jax": jax.__version__,
              "smoke": FLAGS.smoke, "rows": []}
    print(f"# gpu_suite on {result['device']}, jax {jax.__version__}", flush=True)
    t_start = time.perf_counter()
    jobs = []
    if "train" in parts:
        jobs += [lambda n=n, f=f: train_row(n, f) for n, f in TRAIN_MODELS]
    if "sample" in parts:
        jobs.append(sampling_row)
    if "checks" in parts:
        jobs += [dtype_check, attention_check]
    for job in jobs:
        row = job()
        row["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | per-device batch | images/s/device | step | MFU | peak memory |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        if "per_device_batch" in r:
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
            memory = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']} GiB"
            print(f"| {r['model']} | {r['per_device_batch']} | {r['images_per_s_per_device']} | "
                  f"{r['step_ms']} ms | {mfu} | {memory} |")
    if FLAGS.out:
        with open(FLAGS.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
