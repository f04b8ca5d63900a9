"""Switch-DiT (Park et al. 2024): a timestep-gated sparse MoE per block and the diffusion prior.

Per block i, the gate sees only the timestep embedding: p_i(e_t) = softmax(Linear(SiLU(e_t)))
over M experts (Eq. 5); the top-k gates keep their raw softmax values (Eq. 4; not
renormalised, as in the official code). Each expert is a linear map D -> D on every token and
the SMoE output is m(z) = Σ_topk g_j (z W_j + b_j) (Eq. 6), integrated into the block as Table 1
describes: "direct" (m(z) is the block input), "mask" (z ⊙ m(z)), "mask_skip"
((1 - m) ⊙ z + Block(m ⊙ z)); the "_init" designs use m = 1 + Σ ... with experts starting at
zero ("one-vector init"), so "mask_skip_init" (the paper's choice) starts as DiT.

The diffusion prior loss (Eq. 7-11) compares the gates of all T timesteps with a DTR-shaped
prior map after an optimal column assignment; see `diffusion_prior_loss`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switch_dit_jax import cpu_tuning
from switch_dit_jax.models import layers
from switch_dit_jax.models.assignment import optimal_assignment
from switch_dit_jax.models.dtr import dtr_masks

INTEGRATIONS = ("direct", "mask", "mask_skip", "mask_init", "mask_skip_init")
ALLOCATIONS = ("learned", "random")


class SwitchRouter(nn.Module):
    """One block's gate and mask experts. Returns the mask m(z) [B, S, D] (float32)."""
    num_experts: int = 3
    top_k: int = 2
    integration: str = "mask_skip_init"
    noisy_gating: bool = False
    allocation: str = "learned"
    random_allocation: Any = None  # [T, M] fixed gates for allocation == "random"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z, t_emb_all, t, train: bool):
        """z: [B, S, D] tokens; t_emb_all: [T, D] embeddings of every timestep; t: [B] ints."""
        m_exp, d = self.num_experts, z.shape[-1]
        if self.allocation == "random":
            gates = jnp.asarray(self.random_allocation)[t]
        else:
            h = nn.silu(t_emb_all)
            logits_all = layers.dense(m_exp, ("embed", "switch_experts"), jnp.float32,
                                      name="gate")(h)
            self.sow("aux", "gate_probs", jax.nn.softmax(logits_all))  # [T, M], for L_dp
            logits = logits_all[t]
            if self.noisy_gating:
                # Noisy top-k gating (Shazeer et al. 2017): learned, input-dependent noise scale;
                # the layer exists at init (train=False) so that the parameters are created.
                noise_scale = jax.nn.softplus(layers.dense(
                    m_exp, ("embed", "switch_experts"), jnp.float32, layers.zeros,
                    name="noise")(h))[t]
                if train:
                    logits = logits + noise_scale * jax.random.normal(self.make_rng("gating"),
                                                                      logits.shape)
            probs = jax.nn.softmax(logits)
            values, index = jax.lax.top_k(probs, self.top_k)
            gates = jnp.sum(jax.nn.one_hot(index, m_exp) * values[..., None], axis=1)
            self.sow("aux", "batch_probs", probs)  # [B, M], for the load-balancing loss
        self.sow("aux", "batch_gates", gates)

        # Zero experts make m ≡ 1 under the "_init" designs ("one-vector init"); the others
        # start from xavier-initialised experts, as DiT initialises every Linear.
        one_vector = self.integration.endswith("_init")
        init = layers.zeros if one_vector else \
            nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=-2, out_axis=-1)
        kernel = self.param("experts_kernel",
                            layers.logical(init, ("switch_experts", "embed", "mlp")),
                            (m_exp, d, d), jnp.float32)
        bias = self.param("experts_bias", layers.logical(layers.zeros, ("switch_experts", "mlp")),
                          (m_exp, d), jnp.float32)
        # The gates depend on the sample only, so Σ_j g_j (z W_j + b_j) is one linear map per
        # sample: mixing the experts' weights first (B·M·D² work) leaves one D×D matmul per
        # token instead of M.
        w = mix_experts(gates, kernel.reshape(m_exp, d * d)).reshape(-1, d, d)
        out = jnp.einsum("bsd,bde->bse", z.astype(self.dtype), w.astype(self.dtype),
                         preferred_element_type=jnp.float32) + mix_experts(gates, bias)[:, None]
        return 1.0 + out if one_vector else out


@jax.custom_vjp
def mix_experts(gates: jax.Array, experts: jax.Array) -> jax.Array:
    """Σ_j gates[:, j] · experts[j]: [B, M] gates, [M, P] flat expert weights -> [B, P].

    Written as sums of products rather than as matmuls: with K or N = M (2-4) and P = D² + D,
    a matmul is all memory traffic, and XLA:CPU's oneDNN matmuls (cpu_tuning) run these
    shapes 3-25x slower than a fused loop (Switch-DiT-S/2: 12.5 instead of 1.9 ms per block).
    """
    return sum(gates[:, j, None] * experts[j] for j in range(experts.shape[0]))


def _mix_experts_fwd(gates, experts):
    return mix_experts(gates, experts), (gates, experts)


def _mix_experts_bwd(residuals, d_mixed):
    gates, experts = residuals
    d_gates = jnp.sum(d_mixed[:, None, :] * experts[None], axis=-1)  # [B, M]: a fused reduce
    return d_gates, _sum_over_samples(gates, d_mixed)


def _sum_over_samples(gates: jax.Array, d_mixed: jax.Array) -> jax.Array:
    """gates.T @ d_mixed: [M, P].

    A matmul, except on one CPU device whose matmuls are oneDNN's (cpu_tuning): oneDNN runs
    this K = B product at a third of XLA's speed (B = 8: 1.06 against 0.33 ms), so there it
    is B sums of products in one fused loop (0.39 ms; the Switch-DiT-S/2 step 2 % faster).
    Sliced per sample, a batch sharded over devices would have to be gathered: several
    devices, or a batch past 64 samples, keep the matmul.
    """
    if _samples_one_by_one(gates.shape[0]):
        return jnp.stack([sum(gates[b, j] * d_mixed[b] for b in range(gates.shape[0]))
                          for j in range(gates.shape[1])])
    return gates.T @ d_mixed


def _samples_one_by_one(batch: int) -> bool:
    return (cpu_tuning.onednn_active() and jax.default_backend() == "cpu"
            and jax.device_count() == 1 and batch <= 64)


mix_experts.defvjp(_mix_experts_fwd, _mix_experts_bwd)


def prior_activation_map(depth: int, num_experts: int, top_k: int, num_tasks: int = 1000,
                         alpha: float = 4.0) -> np.ndarray:
    """w_prior [T, N·M] of Eq. 7: the DTR sliding window with C = N·M units, window k·N."""
    return dtr_masks(num_tasks, depth * num_experts, alpha=alpha, beta=top_k / num_experts)


def random_allocation_gates(depth: int, num_experts: int, top_k: int, num_tasks: int,
                            alpha: float, seed: int) -> np.ndarray:
    """Table 5's random allocation, as fixed gates [N, T, M] (value 1/k when active).

    Per block: expert 0 serves every timestep; expert 1 the timesteps where a random one of the
    first N columns of w_prior is active, expert 2 the complement. Needs M = 3, k = 2.
    """
    if (num_experts, top_k) != (3, 2):
        raise ValueError(f"routing.allocation='random' is defined for num_experts=3, top_k=2 "
                         f"(Table 5), not {num_experts}, {top_k}.")
    prior = prior_activation_map(depth, num_experts, top_k, num_tasks, alpha)
    columns = np.random.default_rng(seed).permutation(depth)
    gates = np.zeros((depth, num_tasks, num_experts), np.float32)
    gates[:, :, 0] = 1.0
    for i, c in enumerate(columns):
        gates[i, :, 1] = prior[:, c]
        gates[i, :, 2] = 1.0 - prior[:, c]
    return gates / top_k


def gate_activation_map(gate_probs: jax.Array, top_k: int) -> jax.Array:
    """[T, N, M] gate probabilities -> w_gate [T, N·M]: 1 where the expert is in the top-k."""
    _, index = jax.lax.top_k(gate_probs, top_k)
    active = jnp.sum(jax.nn.one_hot(index, gate_probs.shape[-1]), axis=-2)
    return active.reshape(gate_probs.shape[0], -1)


def matching_cost(w_gate: jax.Array, w_prior: jax.Array) -> jax.Array:
    """C[i, j] = Σ_t |w_gate[t, i] - w_prior[t, j]| (Eq. 8-9) for binary maps.

    For 0/1 entries |a - b| = a + b - 2ab, so C is one matmul of the maps stacked with ones:
    [a; 1; -2a]ᵀ [1; b; b]. All entries are integers ≤ T, exact in float32. (One matmul and
    nothing beside it: XLA:CPU's oneDNN fusion cannot compile a matmul summed with other
    terms; see cpu_tuning.)
    """
    a, b = w_gate.astype(jnp.float32), w_prior.astype(jnp.float32)
    lhs = jnp.concatenate([a, jnp.ones_like(a), -2.0 * a])
    rhs = jnp.concatenate([jnp.ones_like(b), b, b])
    return jnp.matmul(lhs.T, rhs, precision=jax.lax.Precision.HIGHEST)


def jensen_shannon(p: jax.Array, q: jax.Array, eps: float = 1e-6) -> jax.Array:
    """JSD(p ‖ q) over the last axis, natural log, eps inside the logs (official form)."""
    m = 0.5 * (p + q)
    kl_pm = jnp.sum(p * (jnp.log(p + eps) - jnp.log(m + eps)), axis=-1)
    kl_qm = jnp.sum(q * (jnp.log(q + eps) - jnp.log(m + eps)), axis=-1)
    return 0.5 * (kl_pm + kl_qm)


def diffusion_prior_loss(gate_probs: jax.Array, t: jax.Array, w_prior: jax.Array, top_k: int,
                         key: jax.Array) -> jax.Array:
    """L_dp (Eq. 10) averaged over the batch.

    gate_probs: [T, N, M] full softmax of every block for every timestep; t: [B] timesteps of
    the batch; w_prior: [T, N·M]. Both maps' columns are first shuffled by fresh permutations
    (so that ties in the assignment break at random, deterministically given `key`), then the
    prior's columns are matched to the gate's.
    """
    num_tasks, depth, m_exp = gate_probs.shape
    k_gate, k_prior = jax.random.split(key)
    perm_gate = jax.random.permutation(k_gate, depth * m_exp)
    perm_prior = jax.random.permutation(k_prior, depth * m_exp)
    w_gate = jax.lax.stop_gradient(gate_activation_map(gate_probs, top_k))[:, perm_gate]
    prior = w_prior[:, perm_prior]
    match = optimal_assignment(matching_cost(w_gate, prior))
    p_tot = gate_probs.reshape(num_tasks, -1)[t][:, perm_gate] / depth
    target = prior[t][:, match]
    target = target / jnp.sum(target, axis=-1, keepdims=True)
    return jnp.mean(jensen_shannon(p_tot, target))


def load_balancing_loss(batch_probs: jax.Array, batch_gates: jax.Array) -> jax.Array:
    """Switch-Transformer balance M·Σ_j f_j·P_j for one block (Table 1's L_load ablation).

    f_j: fraction of the batch's top-k slots routed to expert j; P_j: mean probability of j.
    """
    m_exp = batch_probs.shape[-1]
    dispatched = (batch_gates > 0).astype(jnp.float32)
    f = dispatched.mean(0) / jnp.maximum(dispatched.sum(-1).mean(), 1.0)
    return m_exp * jnp.sum(f * batch_probs.mean(0))
