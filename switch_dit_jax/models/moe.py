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
* The baselines TC-DiT and EC-DiT are in `moe_baselines.py`, on the experts, router and
  expert-choice pieces defined here.

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
    h = layers.gelu_tanh(h + w["fc1_bias"][:, None].astype(dtype))
    out = jnp.einsum("ekf,efd->ekd", h, w["fc2_kernel"].astype(dtype)) + w["fc2_bias"][:, None]
    return out.astype(jnp.float32)


# DiffMoE and EC-DiT: W_r ~ N(0, 0.006). TC-DiT's official MoEGate keeps torch's
# kaiming_uniform(a=√5) of its [E, D] weight: U(±1/√D), i.e. std 1/√(3D).
ROUTER_NORMAL = nn.initializers.normal(0.006)
ROUTER_KAIMING_UNIFORM = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def router_logits(module: nn.Module, x: jax.Array, num_experts: int,
                   init=ROUTER_NORMAL) -> jax.Array:
    w_r = module.param("router", layers.logical(init, ("embed", "experts")),
                       (x.shape[-1], num_experts), jnp.float32)
    return jnp.einsum("...d,de->...e", x.astype(jnp.float32), w_r)


def _scatter_add(pool_size: int, index: jax.Array, values: jax.Array) -> jax.Array:
    """Σ over experts of values [E, K, D] placed at token rows index [E, K] of a [P, D] pool."""
    d = values.shape[-1]
    return jnp.zeros((pool_size, d), values.dtype).at[index.reshape(-1)].add(
        values.reshape(-1, d))


def expert_choice(pool, scores, gate_weight, experts):
    """Expert e takes the tokens index[e] (its best by `scores` [P, e]); y = Σ gate·E(x)."""
    gating, index = jax.lax.top_k(scores.T, gate_weight.shape[-1])  # [e, K]
    out = apply_experts(experts, pool[index]) * (gating * gate_weight)[..., None]
    return _scatter_add(pool.shape[0], index, out), index


def capacity_predictor_logits(pool: jax.Array, num_experts: int) -> jax.Array:
    """DiffMoE's capacity predictor Linear(D, D) -> SiLU -> Linear(D, E) on stop_gradient(x)
    (Eq. 10). Called inside a layer's compact `__call__`: its Dense layers are that layer's
    `capacity_fc1` / `capacity_fc2` (the official names)."""
    d = pool.shape[-1]
    h = nn.silu(layers.dense(d, ("embed", "mlp"), jnp.float32, name="capacity_fc1")(
        jax.lax.stop_gradient(pool)))
    return layers.dense(num_experts, ("mlp", "experts"), jnp.float32, name="capacity_fc2")(h)


def scheduled_experts(module: nn.Module, experts: dict, capacity: float,
                      capacity_schedule: tuple) -> dict:
    """`experts` with the train step's scheduled C_train added as `train_capacity` (shaped
    [E], so that expert parallelism shards it like the weights); unchanged without a schedule
    or outside the train step."""
    step = schedule.current_step(module)
    if not capacity_schedule or step is None:
        return experts
    e = next(iter(experts.values())).shape[0]
    c = schedule.scheduled_capacity(step, capacity, e, *capacity_schedule)
    return {**experts, "train_capacity": jnp.full((e,), c)}


def at_scheduled_capacity(top, experts: dict, size: int, num_experts: int, capacity: float,
                          k: int):
    """`top(weights, size, count)`: every expert's best `size` tokens of `size` candidates
    (DiffMoE: the pool; EC-DiT: a sample), of which the first `count` count.

    Without `train_capacity` that is the plain top-k. With it: the official
    int((size / E) · C), in the same order of operations; while C > C_train every expert may
    need all candidates, those past the count masked; once the schedule has ended the plain
    top-k runs (one branch of the cond executes)."""
    if "train_capacity" not in experts:
        return top(experts, k, k)
    weights = {name: w for name, w in experts.items() if name != "train_capacity"}
    c = experts["train_capacity"][0]
    count = jnp.clip(jnp.floor(size / num_experts * c).astype(jnp.int32), 1, size)
    return jax.lax.cond(c > capacity, lambda: top(weights, size, count),
                        lambda: top(weights, k, k))


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
        routing = {"scores": jax.nn.softmax(router_logits(self, pool, e), axis=-1)}  # [P, E]
        pred_logits = capacity_predictor_logits(pool, e)  # [P, E]
        routing["predicted"] = jax.nn.sigmoid(pred_logits)
        threshold = self.variable("moe_state", "threshold", lambda: jnp.zeros((e,), jnp.float32))
        experts = StackedExperts(e, d, self.hidden_features, self.swiglu, name="experts")()
        pool = pool.astype(self.dtype)

        if train:
            inputs = scheduled_experts(self, experts, self.capacity, self.capacity_schedule)
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
        pool_size = routing["scores"].shape[0]
        return at_scheduled_capacity(
            lambda weights, size, count: self._train_top_k(pool, routing, weights, size, count),
            experts, pool_size, self.num_experts, self.capacity,
            self._top_k(self.capacity, pool_size))

    def _train_top_k(self, pool, routing, experts, size, k):
        """Every expert's best `size` tokens of which the first k (static or traced) count."""
        pool_size, e = routing["scores"].shape
        keep = (jnp.arange(size)[None] < k).astype(jnp.float32) * jnp.ones((e, 1))
        y, index = expert_choice(pool, routing["scores"], keep, experts)
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
        y, _ = expert_choice(pool, routing["scores"], jnp.ones((e, k)), experts)
        return y, {}, {"capacity": jnp.full((e,), k * self.num_experts / pool_size)}

    def _inference_local(self, pool, routing, experts):
        pool_size = pool.shape[0]
        weights = {name: w for name, w in experts.items() if name != "threshold"}
        k_pred = jnp.sum(routing["predicted"] > experts["threshold"][None], axis=0)  # [e]

        def process(size):  # every expert runs its `size` best tokens, those past k_pred masked
            def run():
                keep = (jnp.arange(size)[None] < k_pred[:, None]).astype(jnp.float32)
                y, index = expert_choice(pool, routing["scores"], keep, weights)
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
