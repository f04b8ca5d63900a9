"""The float32 kernels of a DiT-S/2 train step at batch 8: XLA:CPU against torch.

    python benchmarks/cpu_gemm.py [--repeats=20 --rounds=3 --onednn=auto]

What is left of the gap between this project's CPU train step and the official PyTorch one
(benchmarks/vs_pytorch.py) is the speed of the kernels themselves. Each matrix product of a
DiT-S/2 block is timed in its forward form (x·W), its input-gradient form (dy·Wᵀ) and its
weight-gradient form (xᵀ·dy, contracting the 2048 tokens), and attention's forward plus
backward as a whole (this package's kernel, models/attention.py, against torch's
`scaled_dot_product_attention`). jax compiles each as the train step is compiled on this
machine: after the malloc settings, and with the oneDNN options of `cpu_tuning` when
`--onednn` (auto: whenever this jaxlib knows them). Both sides alternate; medians of
`--repeats`, in GFLOP/s, and jax's time over torch's. torch is the user's
(`pip install torch`), not a dependency of the package.
"""
from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from switch_dit_jax import cpu_tuning
from switch_dit_jax.models import attention

flags.DEFINE_integer("repeats", 20, "Timed calls per kernel, library and round.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
flags.DEFINE_enum("onednn", "auto", ["auto", "on", "off"],
                  "Compile jax's side with cpu_tuning.ONEDNN_OPTIONS (auto: if this jaxlib "
                  "knows them, as a large train step on the CPU does).")
FLAGS = flags.FLAGS

TOKENS, WIDTH, HEADS, SEQ = 2048, 384, 6, 256  # DiT-S/2 at batch 8: 8 × 256 tokens
LINEARS = (("qkv", 384, 1152), ("proj", 384, 384), ("fc1", 384, 1536), ("fc2", 1536, 384))


def products():
    """(what, GFLOP, lhs shape, rhs shape, jax form, torch form) of every Linear's three
    products, each TOKENS · d_in · d_out multiply-adds."""
    for name, d_in, d_out in LINEARS:
        gflop = 2 * TOKENS * d_in * d_out / 1e9
        yield (f"{name} forward x·W", gflop, (TOKENS, d_in), (d_in, d_out),
               lambda a, b: a @ b, lambda a, b: a @ b)
        yield (f"{name} input grad dy·Wᵀ", gflop, (TOKENS, d_out), (d_in, d_out),
               lambda a, b: a @ b.T, lambda a, b: a @ b.t())
        yield (f"{name} weight grad xᵀ·dy", gflop, (TOKENS, d_in), (TOKENS, d_out),
               lambda a, b: a.T @ b, lambda a, b: a.t() @ b)


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(name: str, gflop: float, jax_call, torch_call) -> dict:
    ours, theirs = [], []
    for _ in range(FLAGS.rounds):
        ours.append(median_seconds(jax_call, FLAGS.repeats))
        theirs.append(median_seconds(torch_call, FLAGS.repeats))
    row = {"kernel": name, "jax_ms": round(1e3 * statistics.median(ours), 3),
           "torch_ms": round(1e3 * statistics.median(theirs), 3)}
    row["jax_gflops_per_s"] = round(gflop / statistics.median(ours), 1)
    row["torch_gflops_per_s"] = round(gflop / statistics.median(theirs), 1)
    row["jax_over_torch_time"] = round(row["jax_ms"] / row["torch_ms"], 3)
    print(json.dumps(row, ensure_ascii=False), flush=True)
    return row


def main(argv):
    del argv
    try:
        import torch
    except ImportError:
        raise SystemExit("error: torch is not installed; pip install torch.") from None
    onednn = {"on": True, "off": False}.get(FLAGS.onednn, cpu_tuning.onednn_possible())
    # compile_step then compiles as it does a train step for which for_config chose oneDNN,
    # falling back to XLA's matmuls where oneDNN could not compile a kernel.
    cpu_tuning._step_onednn = onednn
    malloc = cpu_tuning.tune_malloc()
    rng = np.random.default_rng(0)
    for name, gflop, a_shape, b_shape, ours, theirs in products():
        a = rng.standard_normal(a_shape).astype(np.float32)
        b = rng.standard_normal(b_shape).astype(np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        step = cpu_tuning.compile_step(jax.jit(ours).lower(ja, jb))
        compare(name, gflop, lambda: step(ja, jb).block_until_ready(), lambda: theirs(ta, tb))

    # Attention over [B, S, H, Dh] = [8, 256, 6, 64] as timm's Attention hands it over (torch:
    # permuted views): 2 products of B·H·S²·Dh multiply-adds forward (QKᵀ, PV), 4 backward.
    q, k, v, g = (rng.standard_normal((TOKENS // SEQ, SEQ, HEADS, WIDTH // HEADS))
                  .astype(np.float32) for _ in range(4))
    jq, jk, jv, jg = map(jnp.asarray, (q, k, v, g))
    loss = lambda q, k, v, g: jnp.sum(attention._heads_first_attention(q, k, v) * g)  # noqa: E731
    grads = cpu_tuning.compile_step(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(jq, jk, jv, jg))
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    tg = torch.from_numpy(g)

    def torch_attention():
        for x in (tq, tk, tv):
            x.grad = None
        heads = [x.permute(0, 2, 1, 3) for x in (tq, tk, tv)]
        out = torch.nn.functional.scaled_dot_product_attention(*heads).permute(0, 2, 1, 3)
        (out * tg).sum().backward()

    gflop = 6 * 2 * (TOKENS // SEQ) * HEADS * SEQ * SEQ * (WIDTH // HEADS) / 1e9
    compare("attention forward + backward", gflop,
            lambda: jax.block_until_ready(grads(jq, jk, jv, jg)), torch_attention)
    print(json.dumps({"jax": jax.__version__, "torch": torch.__version__,
                      "torch_threads": torch.get_num_threads(), "onednn": onednn,
                      "malloc_tuned": malloc}))


if __name__ == "__main__":
    app.run(main)
