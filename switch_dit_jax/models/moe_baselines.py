"""The DiffMoE paper's mixture baselines for the DiT block, on the pieces of `moe.py`.

* `TokenChoiceMoE` (TC-DiT): each token picks its top-k experts, gates unnormalised, sows the
  load-balance statistics (loss E·Σ_e P_e f_e, weight 0.01 in train/step.py); its router
  starts as the official kaiming_uniform(a=√5), U(±1/√D).
* `ExpertChoiceMoE` (EC-DiT): expert choice within each sample, K' = int(S / E · C), with the
  official capacity_schedule and DiffMoE Table 8's dynamic variant.

As in `moe.py`, routing is per token and the expert work runs in a local function under
`expert_parallel.run`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from switch_dit_jax.models import expert_parallel
from switch_dit_jax.models.moe import (ROUTER_KAIMING_UNIFORM, StackedExperts, apply_experts,
                                       at_scheduled_capacity, capacity_predictor_logits,
                                       expert_choice, router_logits, scheduled_experts,
                                       shared_expert)


class TokenChoiceMoE(nn.Module):
    """TC-DiT: per-token top-k experts with unnormalised softmax gates."""
    num_experts: int
    hidden_features: int
    top_k: int = 1
    swiglu: bool = False
    shared_experts: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, s, d = x.shape
        e, pool_size = self.num_experts, b * s
        shared = shared_expert("token_choice", self.shared_experts, self.hidden_features,
                               self.dtype)
        pool = x.reshape(pool_size, d)
        probs = jax.nn.softmax(router_logits(self, pool, e, ROUTER_KAIMING_UNIFORM),
                               axis=-1)  # [P, E]
        gates, choice = jax.lax.top_k(probs, self.top_k)  # [P, k]
        chosen = jax.nn.one_hot(choice, e)  # [P, k, E]
        routed = jnp.sum(chosen, axis=1)  # [P, E]
        weight = jnp.sum(chosen * gates[..., None], axis=1)
        experts = StackedExperts(e, d, self.hidden_features, self.swiglu, name="experts")()
        y, _, _ = expert_parallel.run(_token_choice_local, pool.astype(self.dtype),
                                      {"weight": weight}, experts)
        self.sow("aux", "balance_probs", probs.mean(0))              # P_e
        self.sow("aux", "balance_fraction", routed.mean(0) / self.top_k)  # f_e
        self.sow("aux", "capacity", routed.sum(0) * e / (pool_size * self.top_k))
        y = y.reshape(b, s, d)
        return y if shared is None else y + shared(x, train).astype(jnp.float32)


def _token_choice_local(pool, routing, experts):
    # Dense over experts with zero weight for the unchosen (exact; capacity-free).
    e = routing["weight"].shape[-1]
    out = apply_experts(experts, jnp.broadcast_to(pool[None], (e,) + pool.shape))
    return jnp.einsum("pe,epd->pd", routing["weight"], out), {}, {}


class ExpertChoiceMoE(nn.Module):
    """EC-DiT: within each sample, every expert takes its top K' = int(S / E · C) tokens.

    With `dynamic` (DiffMoE Table 8, "Local Dynamic Intra-sample Routing"), the layer also
    learns DiffMoE's capacity predictor and thresholds, confined to each sample: in training
    the BCE target is the per-sample dispatch and q is the mean over samples of each
    sample's K'-th predicted probability; in inference expert e takes, in each sample, the
    #(sigmoid(pred_e) > τ_e) tokens of that sample with the highest gate scores. The paper
    only names this baseline (the official EC-DiT has no predictor); this is DiffMoE's
    mechanism with the global pool replaced by the sample. Every expert then runs all S
    tokens of a sample, those past its count masked.
    """
    num_experts: int
    hidden_features: int
    capacity: float = 1.0
    swiglu: bool = False
    shared_experts: int = 0
    dynamic: bool = False
    threshold_decay: float = 0.95
    # The official EC-DiT's capacity_schedule, as DiffMoE's: C = E (every expert takes the whole
    # sample) up to stage I, then linear down to `capacity` at stage II; () = off.
    capacity_schedule: tuple = ()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, s, d = x.shape
        e = self.num_experts
        k = max(int(s / e * self.capacity), 1)
        shared = shared_expert("expert_choice", self.shared_experts, self.hidden_features,
                               self.dtype)
        pool = x.reshape(b * s, d)
        routing = {"scores": jax.nn.softmax(router_logits(self, pool, e), axis=-1)}  # [P, E]
        experts = StackedExperts(e, d, self.hidden_features, self.swiglu, name="experts")()
        if self.dynamic:
            pred_logits = capacity_predictor_logits(pool, e)
            routing["predicted"] = jax.nn.sigmoid(pred_logits)
            threshold = self.variable("moe_state", "threshold",
                                      lambda: jnp.zeros((e,), jnp.float32))

        def split(pool, routing):
            e_local = routing["scores"].shape[-1]
            return (pool.reshape(-1, s, d),
                    {n: r.reshape(-1, s, e_local) for n, r in routing.items()}, e_local)

        def top_tokens(tokens, per_sample, experts, size, count):
            """Every expert's best `size` tokens of each sample, of which the first `count`
            (static or traced) count."""
            e_local = per_sample["scores"].shape[-1]
            keep = (jnp.arange(size)[None] < count).astype(jnp.float32) * jnp.ones((e_local, 1))

            def one_sample(tokens, r):
                y, index = expert_choice(tokens, r["scores"], keep, experts)
                dispatch = jnp.zeros((e_local, s), jnp.float32).at[
                    jnp.arange(e_local)[:, None], index].set(keep).T
                kth = (jax.lax.top_k(r["predicted"].T, size)[0][:, count - 1]
                       if "predicted" in r else jnp.zeros((e_local,)))
                return y, dispatch, kth
            y, dispatch, kth = jax.vmap(one_sample)(tokens, per_sample)
            capacity = jnp.full((e_local,), count * e / s, jnp.float32)
            return (y.reshape(-1, d), {"dispatch": dispatch.reshape(-1, e_local)},
                    {"kth": kth.mean(0), "capacity": capacity})

        def local(pool, routing, experts):  # samples are whole within a pool
            tokens, per_sample, _ = split(pool, routing)
            return at_scheduled_capacity(
                lambda weights, size, count: top_tokens(tokens, per_sample, weights, size, count),
                experts, s, e, self.capacity, k)

        def local_dynamic(pool, routing, experts):
            tokens, per_sample, e_local = split(pool, routing)
            weights = {n: w for n, w in experts.items() if n != "threshold"}

            def one_sample(tokens, r):
                count = jnp.sum(r["predicted"] > experts["threshold"][None], axis=0)  # [e]
                keep = (jnp.arange(s)[None] < count[:, None]).astype(jnp.float32)
                return expert_choice(tokens, r["scores"], keep, weights)[0], count
            y, count = jax.vmap(one_sample)(tokens, per_sample)
            capacity = count.astype(jnp.float32).mean(0) * e / s
            return y.reshape(-1, d), {}, {"capacity": capacity}

        pool = pool.astype(self.dtype)
        if self.dynamic and not train:
            y, _, per_expert = expert_parallel.run(
                local_dynamic, pool, routing, {**experts, "threshold": threshold.value})
        else:
            if train:
                experts = scheduled_experts(self, experts, self.capacity, self.capacity_schedule)
            y, per_token, per_expert = expert_parallel.run(local, pool, routing, experts)
            if self.dynamic:
                self.sow("aux", "capacity_logits", pred_logits)
                self.sow("aux", "dispatch", per_token["dispatch"])
                if not self.is_initializing():
                    threshold.value = (self.threshold_decay * threshold.value
                                       + (1 - self.threshold_decay) * per_expert["kth"])
        self.sow("aux", "capacity", per_expert["capacity"])
        y = y.reshape(b, s, d)
        return y if shared is None else y + shared(x, train).astype(jnp.float32)
