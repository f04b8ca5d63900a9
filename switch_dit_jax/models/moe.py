"""Mixture FFNs for the DiT block (DiffMoE, Shi et al. 2025, Algorithms 1-4).

Experts are DiT MLPs (D -> r·D -> D, GELU-tanh) stored stacked ([E, ...], logical axis
"experts"). Each layer has the FFN call signature `ffn(x, train)` with x: [B, S, D].

* `DiffMoE`: a batch-level global token pool [B·S, D] (Eq. 4); gate softmax(x W_r) over the
  experts (Eq. 5, W_r ~ N(0, 0.006)); in training every expert takes its top
  K = int(C_train · B·S / E) tokens by score (Eq. 6) and y = Σ gate · E(x) (Eq. 7). A capacity
  predictor Linear(D, D) -> SiLU -> Linear(D, E) on stop_gradient(x) (Eq. 10) is trained with
  BCE against the dispatch mask (Eq. 11-13; the loss is assembled in train/step.py from the
  sown `capacity_logits` and `dispatch`). Per-expert thresholds τ in the `moe_state`
  collection follow τ <- 0.95 τ + 0.05 q, q = the K-th largest sigmoid(prediction) in the pool.
  In inference, expert e processes the #(sigmoid(pred_e) > τ_e) tokens of highest gate score
  (Algorithm 4; τ replaced by a constant γ for "interval search"), and the layer sows its
  capacity C^E = E·K^E / (B·S) (Eq. 8) for the C_infer accounting (Eq. 9).
* `TokenChoiceMoE` (TC-DiT): each token picks its top-k experts, gates unnormalised, sows the
  load-balance statistics (loss E·Σ_e P_e f_e, weight 0.01 in train/step.py).
* `ExpertChoiceMoE` (EC-DiT): expert choice within each sample, K' = int(S / E · C).

Shapes are static under jit, so the dynamic inference capacity is realised by masking the
tokens beyond k_pred: the numbers are those of Algorithm 4; the compute saving needs a
dynamic-shape kernel and is reported as C_infer rather than realised.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from switch_dit_jax.models import layers

MOE_KINDS = ("mlp", "diffmoe", "token_choice", "expert_choice")


class StackedExperts(nn.Module):
    """E DiT MLPs applied to per-expert token groups [E, K, D] -> [E, K, D]."""
    num_experts: int
    hidden_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        e, d, f = self.num_experts, x.shape[-1], self.hidden_features
        # xavier per expert, as each expert is an nn.Linear pair in the official code.
        init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=-2,
                                                out_axis=-1)
        w1 = self.param("fc1_kernel", layers.logical(init, ("experts", "embed", "mlp")),
                        (e, d, f), jnp.float32)
        b1 = self.param("fc1_bias", layers.logical(layers.zeros, ("experts", "mlp")), (e, f),
                        jnp.float32)
        w2 = self.param("fc2_kernel", layers.logical(init, ("experts", "mlp", "embed")),
                        (e, f, d), jnp.float32)
        b2 = self.param("fc2_bias", layers.logical(layers.zeros, ("experts", "embed")), (e, d),
                        jnp.float32)
        h = jnp.einsum("ekd,edf->ekf", x.astype(self.dtype), w1.astype(self.dtype))
        h = nn.gelu(h + b1[:, None].astype(self.dtype), approximate=True)
        out = jnp.einsum("ekf,efd->ekd", h, w2.astype(self.dtype)) + b2[:, None]
        return out.astype(jnp.float32)


def _router_logits(module: nn.Module, x: jax.Array, num_experts: int) -> jax.Array:
    w_r = module.param("router", layers.logical(nn.initializers.normal(0.006),
                                                ("embed", "experts")),
                       (x.shape[-1], num_experts), jnp.float32)
    return jnp.einsum("...d,de->...e", x.astype(jnp.float32), w_r)


def _scatter_add(pool_size: int, index: jax.Array, values: jax.Array) -> jax.Array:
    """Σ over experts of values [E, K, D] placed at token rows index [E, K] of a [P, D] pool."""
    d = values.shape[-1]
    return jnp.zeros((pool_size, d), values.dtype).at[index.reshape(-1)].add(
        values.reshape(-1, d))


class DiffMoE(nn.Module):
    """Batch-level global token pool with expert choice and a capacity predictor."""
    num_experts: int
    hidden_features: int
    capacity: float = 1.0                 # C_train
    threshold_decay: float = 0.95
    inference: str = "dynamic"            # "dynamic" (learned τ) | "interval" (constant γ)
    interval_threshold: float = 0.5       # γ of the interval search
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, s, d = x.shape
        e, pool_size = self.num_experts, b * s
        pool = x.reshape(pool_size, d)
        scores = jax.nn.softmax(_router_logits(self, pool, e), axis=-1).T  # [E, P]
        predictor = nn.Sequential([
            layers.dense(d, ("embed", "mlp"), jnp.float32, name="capacity_fc1"), nn.silu,
            layers.dense(e, ("mlp", "experts"), jnp.float32, name="capacity_fc2")])
        pred_logits = predictor(jax.lax.stop_gradient(pool))  # [P, E]
        threshold = self.variable("moe_state", "threshold", lambda: jnp.zeros((e,), jnp.float32))
        experts = StackedExperts(e, self.hidden_features, self.dtype, name="experts")

        if train:
            k = int(self.capacity * pool_size / e)
            if k < 1:
                raise ValueError(f"DiffMoE capacity {self.capacity} x pool {pool_size} / "
                                 f"{e} experts selects no token; use a larger batch or capacity.")
            gating, index = jax.lax.top_k(scores, k)  # [E, K]
            out = experts(pool[index]) * gating[..., None]
            y = _scatter_add(pool_size, index, out)
            dispatch = jnp.zeros((e, pool_size), jnp.float32).at[
                jnp.arange(e)[:, None], index].set(1.0).T  # [P, E]
            self.sow("aux", "capacity_logits", pred_logits)
            self.sow("aux", "dispatch", dispatch)
            if not self.is_initializing():
                kth = jax.lax.top_k(jax.nn.sigmoid(pred_logits).T, k)[0][:, -1]  # [E]
                threshold.value = (self.threshold_decay * threshold.value
                                   + (1 - self.threshold_decay) * kth)
            self.sow("aux", "capacity", jnp.full((e,), k * e / pool_size))
            return y.reshape(b, s, d)

        tau = threshold.value if self.inference == "dynamic" else jnp.full(
            (e,), self.interval_threshold)
        k_pred = jnp.sum(jax.nn.sigmoid(pred_logits) > tau[None], axis=0)  # [E]
        gating, index = jax.lax.top_k(scores, pool_size)  # every token, best first
        keep = (jnp.arange(pool_size)[None] < k_pred[:, None]).astype(jnp.float32)
        out = experts(pool[index]) * (gating * keep)[..., None]
        self.sow("aux", "capacity", k_pred.astype(jnp.float32) * e / pool_size)  # C^E, Eq. 8
        return _scatter_add(pool_size, index, out).reshape(b, s, d)


class TokenChoiceMoE(nn.Module):
    """TC-DiT: per-token top-k experts with unnormalised softmax gates."""
    num_experts: int
    hidden_features: int
    top_k: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, s, d = x.shape
        e, pool_size = self.num_experts, b * s
        pool = x.reshape(pool_size, d)
        probs = jax.nn.softmax(_router_logits(self, pool, e), axis=-1)  # [P, E]
        gates, choice = jax.lax.top_k(probs, self.top_k)  # [P, k]
        weight = jnp.sum(jax.nn.one_hot(choice, e) * gates[..., None], axis=1)  # [P, E]
        # Dense over experts with zero weight for the unchosen (exact; capacity-free).
        out = StackedExperts(e, self.hidden_features, self.dtype, name="experts")(
            jnp.broadcast_to(pool[None], (e, pool_size, d)))
        y = jnp.einsum("pe,epd->pd", weight, out)
        routed = jnp.sum(jax.nn.one_hot(choice, e), axis=1)
        self.sow("aux", "balance_probs", probs.mean(0))              # P_e
        self.sow("aux", "balance_fraction", routed.mean(0) / self.top_k)  # f_e
        self.sow("aux", "capacity", routed.sum(0) * e / (pool_size * self.top_k))
        return y.reshape(b, s, d)


class ExpertChoiceMoE(nn.Module):
    """EC-DiT: within each sample, every expert takes its top K' = int(S / E · C) tokens."""
    num_experts: int
    hidden_features: int
    capacity: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, s, d = x.shape
        e = self.num_experts
        k = max(int(s / e * self.capacity), 1)
        scores = jax.nn.softmax(_router_logits(self, x, e), axis=-1)  # [B, S, E]
        gating, index = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), k)  # [B, E, K]
        tokens = x[jnp.arange(b)[:, None, None], index]  # [B, E, K, D]
        experts = StackedExperts(e, self.hidden_features, self.dtype, name="experts")
        flat = jnp.swapaxes(tokens, 0, 1).reshape(e, b * k, d)  # experts see [E, B·K, D]
        out = jnp.swapaxes(experts(flat).reshape(e, b, k, d), 0, 1) * gating[..., None]
        y = jax.vmap(lambda i, v: _scatter_add(s, i, v))(index, out)
        self.sow("aux", "capacity", jnp.full((e,), k * e / s))
        return y
