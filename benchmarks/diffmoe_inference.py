"""DiffMoE inference layer: capacity buckets against running every expert on the whole pool.

    python benchmarks/diffmoe_inference.py [--width=384 --experts=16 --samples=16 --tokens=256]

One DiffMoE layer in inference (Algorithm 4) on a pool of samples·tokens random tokens. The
thresholds are set so that expert e's predicted capacity is K^E = u_e · pool / E with u_e
evenly spread over [0.5, 2] (C_infer ≈ 1.25, the regime of the paper's Table 4), so the layer's
largest K^E is 2 · pool / E. Both variants give the same output (checked here); the timings are
medians of --repeats calls of the jitted layer, measured alternately in one process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switch_dit_jax.models import moe


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=384, help="D (DiT-S: 384)")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256, help="S per sample (256 = 32x32/2)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="", help="optional JSON file for the result")
    args = parser.parse_args()

    e, d, pool = args.experts, args.width, args.samples * args.tokens
    x = jax.random.normal(jax.random.PRNGKey(0), (args.samples, args.tokens, d))
    layers = {"whole pool": moe.DiffMoE(e, 4 * d, inference_buckets=1, dtype=args.dtype),
              "capacity buckets": moe.DiffMoE(e, 4 * d, dtype=args.dtype)}
    variables = nn.unbox(layers["whole pool"].init(jax.random.PRNGKey(1), x, True))
    variables.pop("aux", None)
    _, state = layers["whole pool"].apply(variables, x, True, mutable=["aux", "moe_state"])
    prob = np.asarray(jax.nn.sigmoid(state["aux"]["capacity_logits"][0]))  # [P, E]
    k_target = np.round(np.linspace(0.5, 2.0, e) * pool / e).astype(int)
    ranked = -np.sort(-prob, axis=0)  # τ_e between the K-th and (K+1)-th prediction
    tau = (ranked[k_target - 1, np.arange(e)] + ranked[k_target, np.arange(e)]) / 2
    variables["moe_state"] = {"threshold": jnp.asarray(tau)}

    fns = {name: jax.jit(lambda v, x, layer=layer: layer.apply(v, x, False, mutable=["aux"]))
           for name, layer in layers.items()}
    outputs = {name: jax.block_until_ready(fn(variables, x)) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(variables, x))
            times[name].append(time.perf_counter() - start)

    y_whole, y_buckets = outputs["whole pool"][0], outputs["capacity buckets"][0]
    capacity = np.asarray(outputs["capacity buckets"][1]["aux"]["capacity"][0])
    max_k = int(round(capacity.max() * pool / e))
    sizes = moe.capacity_buckets(pool, layers["capacity buckets"].inference_buckets)
    result = {
        "device": jax.devices()[0].device_kind, "pool": pool, "experts": e, "width": d,
        "dtype": args.dtype, "C_infer": float(capacity.mean()), "max_K": max_k,
        "bucket": min(size for size in sizes if size >= max_k),
        "max_abs_difference": float(jnp.max(jnp.abs(y_whole - y_buckets))),
        "ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
    }
    result["speedup"] = result["ms"]["whole pool"] / result["ms"]["capacity buckets"]
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
