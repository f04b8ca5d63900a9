"""MaxRoaming masks (Pascal et al. 2021, "Maximum Roaming Multi-Task Learning"), DTR Table 8.

Each task (here a timestep cluster, `routing.clusters`, as CDTR) owns a random partition of
int(β·C) of a block's C channels. Every `roaming_period` training steps each task swaps one
channel: it drops one of its active channels, chosen uniformly, and takes one channel it has
never used, chosen uniformly among those. A task therefore visits every channel before it could
revisit any, and after C - int(β·C) swaps (all channels visited) its partition stays fixed:
the update rule of the authors' code (`MR_model.updated_mapping`, one unit per update), which
stops updating once no unvisited unit is left.

The mask of (block, task) after n swaps is a closed-form function of (seed, block, task, n),
drawn on the device inside the train step from the step counter (models/schedule.py); no
mask state is carried between steps. With a uniformly random channel order π of the task,
slot j of its int(β·C) active slots starts with π[j]; swap u (1-based) empties a uniformly
drawn slot j_u and fills it with π[int(β·C) + u - 1], the next unvisited channel. The slot's
channel after n swaps is that of its last swap u <= n, so a scatter-max over the swaps gives
the whole mask without replaying them — the same distribution as the sequential process.

Departure from the authors' code: their initial partition first covers every unit by some
task (a diagonal pattern) and then fills each task at random; here each task's initial
channels are an independent draw (a channel is left uncovered by all K tasks with
probability (1 - β)^K, 2.6e-6 per channel for β = 0.8, K = 8).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from switch_dit_jax.models import schedule
from switch_dit_jax.models.dtr import num_active, timestep_clusters


def num_swaps(channels: int, beta: float) -> int:
    """Swaps until every channel has been visited: the inactive count C - int(β·C)."""
    return channels - num_active(channels, beta)


def swaps_at(step, period: int, channels: int, beta: float) -> jax.Array:
    """Swaps made before training step `step` (0-based): one per completed period, capped."""
    step = jnp.maximum(jnp.asarray(step, jnp.int32), 0)
    return jnp.minimum(step // period, num_swaps(channels, beta))


def roaming_masks(seed: int, block: int, num_tasks: int, channels: int, beta: float,
                  swaps) -> jax.Array:
    """[num_tasks, C] masks of block `block` after `swaps` (traced int) swaps per task."""
    active = num_active(channels, beta)
    total = channels - active
    block_key = jax.random.fold_in(jax.random.PRNGKey(seed), block)

    def one_task(task):
        order_key, slot_key = jax.random.split(jax.random.fold_in(block_key, task))
        order = jax.random.permutation(order_key, channels)
        if total == 0:  # β = 1: every channel active, nothing to roam
            return jnp.ones((channels,), jnp.float32)
        slots = jax.random.randint(slot_key, (total,), 0, active)
        swap = jnp.arange(1, total + 1)
        last = jnp.zeros((active,), jnp.int32).at[slots].max(jnp.where(swap <= swaps, swap, 0))
        held = jnp.where(last > 0, order[active + last - 1], order[:active])
        return jnp.zeros((channels,), jnp.float32).at[held].set(1.0)

    return jax.vmap(one_task)(jnp.arange(num_tasks))


def block_rows(model, block: int, t: jax.Array) -> jax.Array:
    """MaxRoaming masks [B, C] of DiT block `block` for integer timesteps t.

    In training the swaps are those made before the current step; elsewhere (sampling,
    evaluation) those before `routing.roaming_sample_step`, or, when that is -1, every swap:
    the partitions training ends with once it has run num_swaps · roaming_period steps.
    """
    r, channels = model.routing, model.hidden_size
    step = schedule.current_step(model)
    if step is None:
        step = (r["roaming_sample_step"] if r["roaming_sample_step"] >= 0
                else num_swaps(channels, r["beta"]) * r["roaming_period"])
    swaps = swaps_at(step, r["roaming_period"], channels, r["beta"])
    masks = roaming_masks(r["seed"], block, r["clusters"], channels, r["beta"], swaps)
    cluster = jnp.asarray(timestep_clusters(r["num_tasks"], r["clusters"]))
    return masks[cluster[t]]
