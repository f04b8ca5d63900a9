"""Expert parallelism: a mixture layer's expert work as a `jax.shard_map` over 'expert'.

A mixture layer (models/moe.py, models/moe_baselines.py) splits into per-token routing
(router, capacity predictor; left to GSPMD) and a *local* function that, given a token pool,
the routing columns of some experts and those experts' weights, returns their contribution to
every token:

    local_fn(pool [P, D], routing {name: [P, e]}, experts {name: [e, ...]})
        -> (y [P, D], per_token {name: [P, e]}, per_expert {name: [e]})

`run` evaluates it either on one device (no mesh: one pool, every expert) or under the active
('data', 'fsdp', 'expert') mesh, where the pool is the tokens of one expert-parallel group
(the devices that differ only in their 'expert' index; the batch is split over all three axes
with 'expert' the minor one, so a group holds a contiguous block of the global batch):

1. every device all-gathers its group's tokens over 'expert' (in the compute dtype);
   the routing arrays arrive already laid out as [group rows, local experts];
2. it applies its E / n experts to their chosen tokens of the whole group pool, so a token's
   experts may live on any device of the group;
3. `psum_scatter` over 'expert' sums the experts' contributions and hands each device back
   its own tokens.

Selection needs the whole pool, and which device's tokens an expert takes is data dependent,
so with static shapes the worst case of an all-to-all dispatch is the whole pool anyway: the
all-gather moves the same bytes and keeps the selection exact. With mesh.expert = the device
count the whole global batch is one pool; with mesh.expert = 1 every device pools its own
tokens (as the official DiffMoE code does per GPU). Per-expert statistics (e.g. DiffMoE's
K-th predicted probability for the thresholds) are averaged over the groups, so state stays
replicated.
"""
from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from switch_dit_jax import parallel

GROUP_AXES = ("data", "fsdp")  # devices in different expert-parallel groups
EXPERT_AXIS = "expert"


def active_mesh():
    """The mesh set by `jax.set_mesh` when it is a multi-device ('data','fsdp','expert') one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or set(mesh.axis_names) != set(parallel.MESH_AXES):
        return None
    return mesh


def run(local_fn: Callable, pool: jax.Array, routing: dict, experts: dict):
    """`local_fn` over expert-parallel groups; see the module docstring for the contract.

    pool: [P, D] tokens (P = the global token count); routing: {name: [P, E]};
    experts: {name: [E, ...]} (weights and any per-expert inputs). Returns y [P, D],
    per_token {name: [P, E]} and per_expert {name: [E]} (means over the groups).
    """
    mesh = active_mesh()
    if mesh is None:
        return local_fn(pool, routing, experts)
    num_experts = jax.tree.leaves(experts)[0].shape[0]
    n = mesh.shape[EXPERT_AXIS]
    if num_experts % n:
        raise ValueError(f"model.ffn.num_experts={num_experts} is not divisible by "
                         f"config.mesh.expert={n}; choose an expert-parallel size that "
                         "divides the number of experts.")
    if pool.shape[0] % mesh.size:
        raise ValueError(f"{pool.shape[0]} tokens cannot be split over {mesh.size} devices; "
                         "use a batch size divisible by the device count.")

    def sharded(pool, routing, experts):
        group_pool = jax.lax.all_gather(pool, EXPERT_AXIS, axis=0, tiled=True)
        y, per_token, per_expert = local_fn(group_pool, routing, experts)
        y = jax.lax.psum_scatter(y, EXPERT_AXIS, scatter_dimension=0, tiled=True)
        per_expert = jax.tree.map(lambda v: jax.lax.pmean(v, GROUP_AXES), per_expert)
        return y, per_token, per_expert

    batch, by_group = P(parallel.BATCH_AXES), P(GROUP_AXES, EXPERT_AXIS)
    return jax.shard_map(
        sharded, mesh=mesh,
        in_specs=(batch, by_group, P(EXPERT_AXIS)),
        out_specs=(batch, by_group, P(EXPERT_AXIS)))(pool, routing, experts)
