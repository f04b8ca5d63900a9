"""Mixture FFNs for the DiT block (DiffMoE, Shi et al. 2025, Algorithms 1-4).

Experts are DiT MLPs (D -> r·D -> D, GELU-tanh) stored stacked ([E, ...], logical axis
"experts"). Each layer has the FFN call signature `ffn(x, train)` with x: [B, S, D].

* `DiffMoE`: a batch-level global token pool [B·S, D] (Eq. 4); gate softmax(x W_r) over the
  experts (Eq. 5, W_r ~ N(0, 0.006)); in training every expert takes its top
  K = int(C_train · pool / E) tokens by score (Eq. 6) and y = Σ gate · E(x) (Eq. 7). A capacity
  predictor Linear(D, D) -> SiLU -> Linear(D, E) on stop_gradient(x) (Eq. 10) is trained with
  BCE against the dispatch mask (Eq. 11-13; the loss is assembled in train/step.py from the
  sown `capacity_logits` and `dispatch`). Per-expert thresholds τ in the `moe_state`
  collection follow τ <- 0.95 τ + 0.05 q, q = the K-th largest sigmoid(prediction) in the pool.
  In inference, expert e processes the #(sigmoid(pred_e) > τ_e) tokens of highest gate score
  (Algorithm 4; τ replaced by a constant γ for "interval search"; "static" ignores the
  predictor and gives every expert its top int(C · pool / E) tokens, Table 4's "w/o"), and the
  layer sows its capacity C^E = E·K^E / pool (Eq. 8) for the C_infer accounting (Eq. 9).
* `TokenChoiceMoE` (TC-DiT): each token picks its top-k experts, gates unnormalised, sows the
  load-balance statistics (loss E·Σ_e P_e f_e, weight 0.01 in train/step.py); its router
  starts as the official kaiming_uniform(a=√5), U(±1/√D).
* `ExpertChoiceMoE` (EC-DiT): expert choice within each sample, K' = int(S / E · C).

Each layer computes its routing per token and leaves the expert work to a local function run
by `expert_parallel.run`: on one device the pool is the whole batch; under a mesh it is the
tokens of an expert-parallel group and the experts are sharded over 'expert'.

Shapes are static under jit, so the dynamic inference capacity is realised with a few static
sizes (`capacity_buckets`): every expert of a layer runs on the smallest of pool, pool/2, ...,
pool/32 tokens that holds the layer's largest predicted K^E, and tokens beyond each expert's
K^E are masked. The outputs are those of Algorithm 4; the compute is E x that bucket, which is
within a factor of two of E x max K^E rather than equal to Σ K^E.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from switch_dit_jax.models import expert_parallel, layers, schedule

MOE_KINDS = ("mlp", "diffmoe", "token_choice", "expert_choice")


class StackedExperts(nn.Module):
    """The weights of E DiT MLPs (D -> hidden -> D), stacked along a leading expert axis; with
    `swiglu`, of E bias-free SwiGLU FFNs (DiffMoE's use_swiglu experts)."""
    num_experts: int
    features: int
    hidden_features: int
    swiglu: bool = False

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        e, d, f = self.num_experts, self.features, self.hidden_features
        # xavier per expert, as each expert is an nn.Linear pair in the official code.
        init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=-2,
                                                out_axis=-1)
        if self.swiglu:
            names = {"gate_kernel": ("embed", "mlp"), "up_kernel": ("embed", "mlp"),
                     "down_kernel": ("mlp", "embed")}
            return {name: self.param(name, layers.logical(init, ("experts",) + axes),
                                     (e, d, f) if axes[0] == "embed" else (e, f, d), jnp.float32)
                    for name, axes in names.items()}
        return {
            "fc1_kernel": self.param("fc1_kernel", layers.logical(
                init, ("experts", "embed", "mlp")), (e, d, f), jnp.float32),
            "fc1_bias": self.param("fc1_bias", layers.logical(
                layers.zeros, ("experts", "mlp")), (e, f), jnp.float32),
            "fc2_kernel": self.param("fc2_kernel", layers.logical(
                init, ("experts", "mlp", "embed")), (e, f, d), jnp.float32),
            "fc2_bias": self.param("fc2_bias", layers.logical(
                layers.zeros, ("experts", "embed")), (e, d), jnp.float32),
        }


def apply_experts(w: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """Expert e of the stack `w` on its token group x[e]: [e, K, D] -> [e, K, D] (float32)."""
    dtype = x.dtype
    if "gate_kernel" in w:  # SwiGLU experts
        gate = jnp.einsum("ekd,edf->ekf", x, w["gate_kernel"].astype(dtype))
        up = jnp.einsum("ekd,edf->ekf", x, w["up_kernel"].astype(dtype))
        return jnp.einsum("ekf,efd->ekd", nn.silu(gate) * up,
                          w["down_kernel"].astype(dtype)).astype(jnp.float32)
    h = jnp.einsum("ekd,edf->ekf", x, w["fc1_kernel"].astype(dtype))
    h = nn.gelu(h + w["fc1_bias"][:, None].astype(dtype), approximate=True)
    out = jnp.einsum("ekf,efd->ekd", h, w["fc2_kernel"].astype(dtype)) + w["fc2_bias"][:, None]
    return out.astype(jnp.float32)


# DiffMoE and EC-DiT: W_r ~ N(0, 0.006). TC-DiT's official MoEGate keeps torch's
# kaiming_uniform(a=√5) of its [E, D] weight: U(±1/√D), i.e. std 1/√(3D).
ROUTER_NORMAL = nn.initializers.normal(0.006)
ROUTER_KAIMING_UNIFORM = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _router_logits(module: nn.Module, x: jax.Array, num_experts: int,
                   init=ROUTER_NORMAL) -> jax.Array:
    w_r = module.param("router", layers.logical(init, ("embed", "experts")),
                       (x.shape[-1], num_experts), jnp.float32)
    return jnp.einsum("...d,de->...e", x.astype(jnp.float32), w_r)


def _scatter_add(pool_size: int, index: jax.Array, values: jax.Array) -> jax.Array:
    """Σ over experts of values [E, K, D] placed at token rows index [E, K] of a [P, D] pool."""
    d = values.shape[-1]
    return jnp.zeros((pool_size, d), values.dtype).at[index.reshape(-1)].add(
        values.reshape(-1, d))


def _expert_choice(pool, scores, gate_weight, experts):
    """Expert e takes the tokens index[e] (its best by `scores` [P, e]); y = Σ gate·E(x)."""
    gating, index = jax.lax.top_k(scores.T, gate_weight.shape[-1])  # [e, K]
    out = apply_experts(experts, pool[index]) * (gating * gate_weight)[..., None]
    return _scatter_add(pool.shape[0], index, out), index


def shared_expert(kind: str, count: int, hidden_features: int, dtype) -> nn.Module | None:
    """The always-on expert that official mixtures add to their output when
    n_shared_experts > 0: DiffMoE's is one GELU MLP twice the expert width (whatever the
    count); TC-DiT's and EC-DiT's a SwiGLU of width count·D."""
    if count == 0:
        return None
    if kind == "diffmoe":
        return layers.Mlp(2 * hidden_features, dtype, name="shared_experts")
    return _SharedSwiGLU(count, dtype, name="shared_experts")


class _SharedSwiGLU(nn.Module):
    count: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        return layers.SwiGLU(self.count * x.shape[-1], self.dtype, name="ffn")(x, train)


class DiffMoE(nn.Module):
    """Batch-level global token pool with expert choice and a capacity predictor."""
    num_experts: int
    hidden_features: int
    capacity: float = 1.0                 # C_train
    threshold_decay: float = 0.95
    # "dynamic" (learned τ) | "interval" (constant γ) | "static" (no capacity predictor: every
    # expert takes its top int(static_capacity · pool / E) tokens, DiffMoE Table 4 / Fig. 6)
    inference: str = "dynamic"
    interval_threshold: float = 0.5       # γ of the interval search
    static_capacity: float = 1.0          # C of the static top-K inference
    # Inference runs each expert on pool / 2^j tokens for the smallest j that fits (j < this
    # count): compute follows the predicted capacity instead of E x the pool. 1 = whole pool.
    inference_buckets: int = 6
    swiglu: bool = False                  # SwiGLU experts (official use_swiglu)
    shared_experts: int = 0               # official n_shared_experts (see shared_expert)
    # Official capacity_schedule (stage_I_iters, stage_II_iters): C_train = E up to stage I,
    # then linear down to `capacity` at stage II (schedule.scheduled_capacity); () = off.
    capacity_schedule: tuple = ()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, s, d = x.shape
        e = self.num_experts
        shared = shared_expert("diffmoe", self.shared_experts, self.hidden_features, self.dtype)
        pool = x.reshape(b * s, d)
        routing = {"scores": jax.nn.softmax(_router_logits(self, pool, e), axis=-1)}  # [P, E]
        predictor = nn.Sequential([
            layers.dense(d, ("embed", "mlp"), jnp.float32, name="capacity_fc1"), nn.silu,
            layers.dense(e, ("mlp", "experts"), jnp.float32, name="capacity_fc2")])
        pred_logits = predictor(jax.lax.stop_gradient(pool))  # [P, E]
        routing["predicted"] = jax.nn.sigmoid(pred_logits)
        threshold = self.variable("moe_state", "threshold", lambda: jnp.zeros((e,), jnp.float32))
        experts = StackedExperts(e, d, self.hidden_features, self.swiglu, name="experts")()
        pool = pool.astype(self.dtype)

        if train:
            step = schedule.current_step(self)
            inputs = experts
            if self.capacity_schedule and step is not None:
                c = schedule.scheduled_capacity(step, self.capacity, e, *self.capacity_schedule)
                inputs = {**experts, "train_capacity": jnp.full((e,), c)}
            y, per_token, per_expert = expert_parallel.run(self._train_local, pool, routing,
                                                           inputs)
            self.sow("aux", "capacity_logits", pred_logits)
            self.sow("aux", "dispatch", per_token["dispatch"])
            if not self.is_initializing():
                threshold.value = (self.threshold_decay * threshold.value
                                   + (1 - self.threshold_decay) * per_expert["kth"])
        elif self.inference == "static":
            y, _, per_expert = expert_parallel.run(self._static_local, pool, routing, experts)
        else:
            tau = threshold.value if self.inference == "dynamic" else jnp.full(
                (e,), self.interval_threshold)
            y, per_token, per_expert = expert_parallel.run(self._inference_local, pool, routing,
                                                           {**experts, "threshold": tau})
            # Each sample's share, Σ_e (its tokens expert e processed) / S: the per-class
            # compute of DiffMoE Figs. 13-14 (its mean over the samples is C_infer, Eq. 9).
            self.sow("aux", "sample_capacity",
                     per_token["processed"].sum(-1).reshape(b, s).mean(-1))
        self.sow("aux", "capacity", per_expert["capacity"])  # C^E, Eq. 8
        y = y.reshape(b, s, d)
        return y if shared is None else y + shared(x, train).astype(jnp.float32)

    def _train_local(self, pool, routing, experts):
        pool_size, e = routing["scores"].shape
        k = self._top_k(self.capacity, pool_size)
        if "train_capacity" not in experts:
            return self._train_top_k(pool, routing, experts, k, k)
        weights = {name: w for name, w in experts.items() if name != "train_capacity"}
        c = experts["train_capacity"][0]
        # The official int((S / E) · C), in the same order of operations.
        k_now = jnp.clip(jnp.floor(pool_size / self.num_experts * c).astype(jnp.int32), 1,
                         pool_size)
        # Above C_train every expert may need the whole pool, with the tokens past k_now
        # masked; once the schedule has ended the plain top-k runs (one branch executes).
        return jax.lax.cond(
            c > self.capacity,
            lambda: self._train_top_k(pool, routing, weights, pool_size, k_now),
            lambda: self._train_top_k(pool, routing, weights, k, k))

    def _train_top_k(self, pool, routing, experts, size, k):
        """Every expert's best `size` tokens of which the first k (static or traced) count."""
        pool_size, e = routing["scores"].shape
        keep = (jnp.arange(size)[None] < k).astype(jnp.float32) * jnp.ones((e, 1))
        y, index = _expert_choice(pool, routing["scores"], keep, experts)
        dispatch = jnp.zeros((e, pool_size), jnp.float32).at[
            jnp.arange(e)[:, None], index].set(keep).T  # [P, e]
        kth = jax.lax.top_k(routing["predicted"].T, size)[0][:, k - 1]  # [e]
        capacity = jnp.full((e,), k * self.num_experts / pool_size, jnp.float32)
        return y, {"dispatch": dispatch}, {"kth": kth, "capacity": capacity}

    def _top_k(self, capacity: float, pool_size: int) -> int:
        k = int(capacity * pool_size / self.num_experts)
        if k < 1:
            raise ValueError(f"DiffMoE capacity {capacity} x pool {pool_size} / "
                             f"{self.num_experts} experts selects no token; use a larger batch "
                             "or capacity.")
        return min(k, pool_size)

    def _static_local(self, pool, routing, experts):
        pool_size, e = routing["scores"].shape
        k = self._top_k(self.static_capacity, pool_size)
        y, _ = _expert_choice(pool, routing["scores"], jnp.ones((e, k)), experts)
        return y, {}, {"capacity": jnp.full((e,), k * self.num_experts / pool_size)}

    def _inference_local(self, pool, routing, experts):
        pool_size = pool.shape[0]
        weights = {name: w for name, w in experts.items() if name != "threshold"}
        k_pred = jnp.sum(routing["predicted"] > experts["threshold"][None], axis=0)  # [e]

        def process(size):  # every expert runs its `size` best tokens, those past k_pred masked
            def run():
                keep = (jnp.arange(size)[None] < k_pred[:, None]).astype(jnp.float32)
                y, index = _expert_choice(pool, routing["scores"], keep, weights)
                processed = jnp.zeros((keep.shape[0], pool_size), jnp.float32).at[
                    jnp.arange(keep.shape[0])[:, None], index].set(keep).T  # [P, e]
                return y, processed
            return run
        sizes = capacity_buckets(pool_size, self.inference_buckets)
        smallest_fit = jnp.sum(jnp.asarray(sizes) >= jnp.max(k_pred)) - 1
        y, processed = jax.lax.switch(smallest_fit, [process(size) for size in sizes])
        return y, {"processed": processed}, {
            "capacity": k_pred.astype(jnp.float32) * self.num_experts / pool_size}


def capacity_buckets(pool_size: int, count: int) -> list[int]:
    """Static token counts per expert for inference: pool, pool/2, ... (count sizes, descending).

    Shapes must be static under jit, so an expert's predicted K^E is served by the smallest
    bucket that holds the largest K^E of the layer; the tokens beyond each K^E are masked.
    """
    return sorted({-(-pool_size // 2 ** j) for j in range(count)}, reverse=True)


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
        probs = jax.nn.softmax(_router_logits(self, pool, e, ROUTER_KAIMING_UNIFORM),
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
        routing = {"scores": jax.nn.softmax(_router_logits(self, pool, e), axis=-1)}  # [P, E]
        experts = StackedExperts(e, d, self.hidden_features, self.swiglu, name="experts")()
        if self.dynamic:
            predictor = nn.Sequential([
                layers.dense(d, ("embed", "mlp"), jnp.float32, name="capacity_fc1"), nn.silu,
                layers.dense(e, ("mlp", "experts"), jnp.float32, name="capacity_fc2")])
            pred_logits = predictor(jax.lax.stop_gradient(pool))
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
                y, index = _expert_choice(tokens, r["scores"], keep, experts)
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
            if "train_capacity" not in experts:
                return top_tokens(tokens, per_sample, experts, k, k)
            weights = {n: w for n, w in experts.items() if n != "train_capacity"}
            c = experts["train_capacity"][0]
            # The official int((S / E) · C), in the same order of operations; above C_train
            # every expert may need the whole sample, the tokens past the count masked.
            count = jnp.clip(jnp.floor(s / e * c).astype(jnp.int32), 1, s)
            return jax.lax.cond(c > self.capacity,
                                lambda: top_tokens(tokens, per_sample, weights, s, count),
                                lambda: top_tokens(tokens, per_sample, weights, k, k))

        def local_dynamic(pool, routing, experts):
            tokens, per_sample, e_local = split(pool, routing)
            weights = {n: w for n, w in experts.items() if n != "threshold"}

            def one_sample(tokens, r):
                count = jnp.sum(r["predicted"] > experts["threshold"][None], axis=0)  # [e]
                keep = (jnp.arange(s)[None] < count[:, None]).astype(jnp.float32)
                return _expert_choice(tokens, r["scores"], keep, weights)[0], count
            y, count = jax.vmap(one_sample)(tokens, per_sample)
            capacity = count.astype(jnp.float32).mean(0) * e / s
            return y.reshape(-1, d), {}, {"capacity": capacity}

        pool = pool.astype(self.dtype)
        if self.dynamic and not train:
            y, _, per_expert = expert_parallel.run(
                local_dynamic, pool, routing, {**experts, "threshold": threshold.value})
        else:
            step = schedule.current_step(self) if train else None
            if self.capacity_schedule and step is not None:
                c = schedule.scheduled_capacity(step, self.capacity, e, *self.capacity_schedule)
                experts = {**experts, "train_capacity": jnp.full((e,), c)}
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
