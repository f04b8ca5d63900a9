"""Model behaviour that changes over training: how the step counter reaches the modules.

The train step hands the model its step as a read-only `schedule` collection
(`schedule_variables`), at the root and at every block's FFN, so a module reads it with
`current_step(self)` inside the jitted step: the value is traced, never a host-side Python
number, and the module's parameters do not depend on it. Outside training (sampling,
evaluation) the collection is absent and `current_step` returns None; each user says what it
means then.

Users: MaxRoaming masks (models/roaming.py) and the DiffMoE and EC-DiT `capacity_schedule`
(`scheduled_capacity`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

SCHEDULE = "schedule"
SCHEDULED_FFNS = ("diffmoe", "expert_choice")  # the FFNs with a capacity_schedule


def needs_step(model) -> bool:
    """Whether `model` (a DiT or UNet) reads the training step."""
    routing, ffn = getattr(model, "routing", None) or {}, getattr(model, "ffn", None) or {}
    return (routing.get("kind") == "maxroaming"
            or (ffn.get("kind") in SCHEDULED_FFNS
                and tuple(ffn.get("capacity_schedule", ())) != ()))


def schedule_variables(depth: int, step: jax.Array) -> dict:
    """The `schedule` collection for a DiT of `depth` blocks at training step `step`."""
    step = jnp.asarray(step, jnp.int32)
    return {SCHEDULE: {"step": step,
                       **{f"blocks_{i}": {"mlp": {"step": step}} for i in range(depth)}}}


def current_step(module: nn.Module) -> jax.Array | None:
    """The training step given to this module, or None outside the train step."""
    if module.has_variable(SCHEDULE, "step"):
        return module.get_variable(SCHEDULE, "step")
    return None


def scheduled_capacity(step, capacity: float, num_experts: int, stage_i: int,
                       stage_ii: int) -> jax.Array:
    """DiffMoE's official capacity_schedule: every expert takes the whole pool (C = E) up to
    step `stage_i`, then C falls linearly to C_train at `stage_ii` and stays there.

    The official model counts `training_iters` from 0 at the first forward pass, as our
    0-based step; its bounds are inclusive (<= stage_i, <= stage_ii)."""
    step = jnp.asarray(step, jnp.float32)
    falling = capacity + (num_experts - capacity) * (stage_ii - step) / max(stage_ii - stage_i, 1)
    return jnp.where(step <= stage_i, float(num_experts),
                     jnp.where(step <= stage_ii, falling, capacity))
