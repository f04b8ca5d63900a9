"""Scaled dot-product attention: the kernel choice and this package's XLA kernel.

`model.attention_impl="auto"` picks cuDNN's fused flash attention where it applies (a GPU, a
16-bit compute dtype, a head dim it supports) and the XLA kernel below everywhere else.

The XLA kernel works on heads-first [B·H, S, Dh] operands, so every product is a plain batched
matmul, and has a hand-written backward: it keeps the softmax probabilities P and the output O
of the forward pass and uses dS = P ⊙ (dP − rowsum(dO ⊙ O)) (FlashAttention's identity, exact),
which saves the [S, S] reduction of the generic softmax backward. On XLA:CPU this is 2.1× faster
than `jax.nn.dot_product_attention`'s XLA path for the DiT-S shapes, forward plus backward.
On a single-device CPU backend whose matmuls are XLA's own, the batch is cut into one group of
samples per core (`cpu_chains`), each its own chain of products, because XLA:CPU then runs a
batched matmul on one thread but runs independent ops side by side; its oneDNN matmuls
(`switch_dit_jax.cpu_tuning`) use every core and do better on the whole batch.
"""
from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

from switch_dit_jax import cpu_tuning

log = logging.getLogger("switch_dit_jax")

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_head_dim_ok(head_dim: int, hopper: bool) -> bool:
    """cuDNN flash attention's head dims: multiples of 8 up to 128 (256 on Hopper)."""
    return head_dim % 8 == 0 and head_dim <= (256 if hopper else 128)


def is_hopper(device) -> bool:
    capability = getattr(device, "compute_capability", "") or ""
    kind = getattr(device, "device_kind", "") or ""
    return capability.startswith("9.") or any(h in kind for h in ("H100", "H200", "H800", "GH200"))


def choose_implementation(requested: str | None, dtype, head_dim: int,
                          platform: str | None = None, device=None) -> str:
    """The kernel that runs: "xla" or "cudnn" (`requested` "auto" decides by the rules above)."""
    requested = "auto" if requested is None else requested
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl={requested!r}; use one of "
                         f"{list(ATTENTION_IMPLS)}.")
    if requested != "auto":
        return requested
    if device is None:
        device = jax.devices()[0]
    platform = platform or device.platform
    if (platform == "gpu" or platform == "cuda") and jnp.dtype(dtype) in map(jnp.dtype,
                                                                        _CUDNN_DTYPES) \
            and cudnn_head_dim_ok(head_dim, is_hopper(device)):
        choice = "cudnn"
    else:
        choice = "xla"
    _log_choice(choice, platform, jnp.dtype(dtype).name, head_dim)
    return choice


@functools.lru_cache(maxsize=None)
def _log_choice(choice: str, platform: str, dtype: str, head_dim: int) -> None:
    log.info("attention_impl='auto' chose %r (backend %s, compute dtype %s, head dim %d).",
             choice, platform, dtype, head_dim)


def _forward(q, k, v):
    # The scale applies to the logits rather than to q: an elementwise op on a matmul operand
    # makes XLA:CPU's oneDNN fusion build a kernel oneDNN cannot compile (cpu_tuning).
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqd,bkd->bqk", q, k, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("bqk,bkd->bqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.astype(q.dtype), p


@jax.custom_vjp
def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q kᵀ / √Dh) v for heads-first [N, S, Dh] operands (N = batch · heads)."""
    return _forward(q, k, v)[0]


def _xla_attention_fwd(q, k, v):
    o, p = _forward(q, k, v)
    return o, (q, k, v, p, o)


def _xla_attention_bwd(residuals, do):
    q, k, v, p, o = residuals
    scale = q.shape[-1] ** -0.5
    f32 = jnp.float32
    dp = jnp.einsum("bqd,bkd->bqk", do, v, preferred_element_type=f32)
    row = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1, keepdims=True)
    ds = (p * (dp - row)).astype(q.dtype)
    dq = jnp.einsum("bqk,bkd->bqd", ds, k, preferred_element_type=f32) * scale
    dv = jnp.einsum("bqk,bqd->bkd", p.astype(do.dtype), do, preferred_element_type=f32)
    dk = jnp.einsum("bqk,bqd->bkd", ds, q, preferred_element_type=f32) * scale
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def cpu_chains(batch: int, platform: str, num_devices: int, cores: int, onednn: bool) -> int:
    """Independent attention chains for a single-device CPU program with XLA's own matmuls:
    the largest divisor of the batch that is at most the core count (1 elsewhere).

    Attention over `cores` disjoint groups of samples keeps every core busy (DiT-S/2 at
    batch 8 on 2 cores: the train step 2.5 % faster; with oneDNN matmuls, 1 % slower). A
    sharded batch is left whole.
    """
    if platform != "cpu" or num_devices != 1 or onednn:
        return 1
    return max(p for p in range(1, max(1, min(cores, batch)) + 1) if batch % p == 0)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str):
    """[B, S, H, Dh] queries, keys, values -> [B, S, H, Dh] with the chosen kernel."""
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    chains = cpu_chains(q.shape[0], jax.default_backend(), jax.device_count(), _cores(),
                        cpu_tuning.onednn_active())
    if chains > 1:
        n = q.shape[0] // chains
        return jnp.concatenate([_heads_first_attention(*(x[i * n:(i + 1) * n] for x in (q, k, v)))
                                for i in range(chains)])
    return _heads_first_attention(q, k, v)


def _heads_first_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    b, s, h, d = q.shape
    heads_first = lambda x: x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], d)  # noqa: E731
    out = xla_attention(heads_first(q), heads_first(k), heads_first(v))
    return out.reshape(b, h, s, d).transpose(0, 2, 1, 3)
