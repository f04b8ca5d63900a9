"""Workarounds for XLA:CPU's fusion and matmul heuristics; on other backends they are identities.

`stored(x)` makes XLA compute and keep `x` in memory as laid out, where it would otherwise fuse
it into its consumers (recomputing it in each) or fold a transpose into a slow matmul form.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def stored(x: jax.Array) -> jax.Array:
    # A conditional is a boundary XLA does not fuse across, and JAX keeps it because the
    # branches differ (the second multiplies by one); the predicate is a value XLA cannot fold.
    return jax.lax.cond(jnp.isfinite(x.reshape(-1)[0]), lambda v: v, lambda v: v * 1.0, x)


@jax.custom_vjp
def _materialize_cpu(x):
    return stored(x)


_materialize_cpu.defvjp(lambda x: (stored(x), None), lambda _, g: (stored(g),))


def materialize(x: jax.Array) -> jax.Array:
    """The identity; on CPU, XLA computes its value and its cotangent once and stores them.

    Between blocks, the residual stream and its cotangent are chains of elementwise adds.
    XLA:CPU fuses such chains into every consumer, recomputing the stream (and, in the
    backward pass, the cotangent) of all earlier blocks inside each later fusion: a cost that
    grows with the square of the depth (DiT-S/2's train step spent 28 % of its time in it).
    `optimization_barrier` does not help, since XLA:CPU drops it before fusion. GPUs and TPUs
    price duplication in their fusion passes, and a conditional would cost a GPU a host sync,
    so there this is the plain identity.
    """
    return _materialize_cpu(x) if jax.default_backend() == "cpu" else x
