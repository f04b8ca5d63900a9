"""The float32 matrix products of a DiT-S/2 train step at batch 8: XLA:CPU against torch (MKL).

    python benchmarks/cpu_gemm.py [--repeats=20 --rounds=3]

What is left of the gap between this project's CPU train step and the official PyTorch one
(benchmarks/vs_pytorch.py) is the speed of the kernels themselves: each shape is timed with
jax (one jitted product) and torch (`a @ b`), alternating, medians of `--repeats`, and reported
in GFLOP/s. torch is the user's (`pip install torch`), not a dependency of the package.
"""
from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

flags.DEFINE_integer("repeats", 20, "Timed products per shape, library and round.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
FLAGS = flags.FLAGS

# (what, lhs shape, rhs shape): the DiT-S/2 block at batch 8 (2048 tokens, width 384).
SHAPES = (
    ("qkv", (2048, 384), (384, 1152)),
    ("fc1", (2048, 384), (384, 1536)),
    ("fc2", (2048, 1536), (1536, 384)),
    ("attention QKᵀ", (48, 256, 64), (48, 64, 256)),
    ("attention PV", (48, 256, 256), (48, 256, 64)),
)


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv):
    del argv
    try:
        import torch
    except ImportError:
        raise SystemExit("error: torch is not installed; pip install torch.") from None
    product = jax.jit(lambda a, b: a @ b)
    rows = []
    for name, a_shape, b_shape in SHAPES:
        rng = np.random.default_rng(0)
        a = rng.standard_normal(a_shape).astype(np.float32)
        b = rng.standard_normal(b_shape).astype(np.float32)
        ta, tb, ja, jb = torch.from_numpy(a), torch.from_numpy(b), jnp.asarray(a), jnp.asarray(b)
        gflop = 2 * np.prod(a_shape) * b_shape[-1] / 1e9
        xla, mkl = [], []
        for _ in range(FLAGS.rounds):
            xla.append(median_seconds(lambda: product(ja, jb).block_until_ready(), FLAGS.repeats))
            mkl.append(median_seconds(lambda: ta @ tb, FLAGS.repeats))
        row = {"product": name, "shapes": [a_shape, b_shape],
               "jax_gflops_per_s": round(gflop / statistics.median(xla), 1),
               "torch_gflops_per_s": round(gflop / statistics.median(mkl), 1)}
        row["jax_over_torch_time"] = round(row["torch_gflops_per_s"] / row["jax_gflops_per_s"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"jax": jax.__version__, "torch": torch.__version__,
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    app.run(main)
