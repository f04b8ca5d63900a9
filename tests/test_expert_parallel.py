"""Expert parallelism: the shard_map layers equal the single-device layers, group by group.

Under a ('data', 'fsdp', 'expert') mesh the DiffMoE pool is the tokens of one expert-parallel
group: the n = mesh.expert devices that share a (data, fsdp) index, i.e. a contiguous block of
B / (data·fsdp) samples. The reference applies the single-device layer (itself checked against
brute force in test_moe.py) to each block separately; per-expert statistics (threshold
targets, capacities) are the mean over the blocks.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switch_dit_jax import parallel
from switch_dit_jax.models import moe, moe_baselines

B, S, D, E, F = 16, 4, 8, 8, 16
# (data, fsdp, expert): experts on 1, 2, 4 and 8 devices.
MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]
LAYERS = {"diffmoe": lambda: moe.DiffMoE(E, F),
          "token_choice": lambda: moe_baselines.TokenChoiceMoE(E, F, top_k=2),
          "expert_choice": lambda: moe_baselines.ExpertChoiceMoE(E, F)}


def tokens(seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, S, D))


def init(layer, x):
    variables = nn.unbox(layer.init(jax.random.PRNGKey(1), x[:2], True))
    variables.pop("aux", None)
    # Non-zero biases and thresholds, so a misplaced expert or token cannot hide behind zeros.
    variables["params"]["experts"] = jax.tree.map(
        lambda w: w + 0.1 * jnp.cos(jnp.arange(w.size).reshape(w.shape)),
        variables["params"]["experts"])
    if "moe_state" in variables:
        variables["moe_state"] = {"threshold": jnp.linspace(0.3, 0.7, layer.num_experts)}
    return variables


def apply(layer, variables, x, train, cotangent):
    """Output, aux/state collections and the gradient of <y, cotangent> w.r.t. params and x."""
    def loss(params, x):
        y, state = layer.apply({**variables, "params": params}, x, train,
                               mutable=["aux", "moe_state"])
        return jnp.sum(y * cotangent), (y, state)
    (_, (y, state)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x)
    return jax.device_get((y, state, grads))


def reference(layer, variables, x, train, cotangent, groups):
    """The single-device layer on each block of B / groups samples; stats averaged."""
    parts = [jax.jit(apply, static_argnums=(0, 3))(layer, variables, xg, train, cg)
             for xg, cg in zip(np.split(np.asarray(x), groups),
                               np.split(np.asarray(cotangent), groups))]
    y = np.concatenate([p[0] for p in parts])
    grads_params = jax.tree.map(lambda *g: sum(g), *[p[2][0] for p in parts])
    grads_x = np.concatenate([p[2][1] for p in parts])
    per_token = {name: np.concatenate([p[1]["aux"][name][0] for p in parts])
                 for name in ("dispatch", "capacity_logits") if name in parts[0][1]["aux"]}
    per_expert = {name: np.mean([p[1]["aux"][name][0] for p in parts], axis=0)
                  for name in ("capacity", "balance_probs", "balance_fraction")
                  if name in parts[0][1]["aux"]}
    state = {}
    if "moe_state" in parts[0][1]:  # the EMA step is linear in the target: mean of the updates
        state = {"threshold": np.mean([p[1]["moe_state"]["threshold"] for p in parts], axis=0)}
    return y, per_token, per_expert, state, (grads_params, grads_x)


def sharded(layer, variables, x, train, cotangent, sizes):
    mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, sizes)))
    with jax.set_mesh(mesh):
        y, state, grads = jax.jit(apply, static_argnums=(0, 3))(layer, variables, x, train,
                                                                cotangent)
    aux = {name: v[0] for name, v in state.get("aux", {}).items()}
    return y, aux, state.get("moe_state", {}), grads


def assert_close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("sizes", MESHES)
@pytest.mark.parametrize("kind,train", [("diffmoe", True), ("diffmoe", False),
                                        ("token_choice", True), ("expert_choice", True)])
def test_sharded_layer_equals_single_device_per_group(kind, train, sizes):
    layer = LAYERS[kind]()
    x = tokens()
    cotangent = jax.random.normal(jax.random.PRNGKey(7), x.shape)
    variables = init(layer, x)
    groups = sizes[0] * sizes[1]
    y_ref, tok_ref, exp_ref, state_ref, grads_ref = reference(layer, variables, x, train,
                                                              cotangent, groups)
    y, aux, state, grads = sharded(layer, variables, x, train, cotangent, sizes)
    assert_close(y, y_ref)
    assert_close(grads, grads_ref)  # router, experts (and x): every gradient
    for name, value in {**tok_ref, **exp_ref}.items():
        assert_close(aux[name], value)
    if "dispatch" in tok_ref:  # C_train = 1: each expert takes exactly its share of a pool
        per_pool = np.asarray(aux["dispatch"]).reshape(groups, -1, E).sum(1)
        assert np.all(per_pool == B * S // groups // E)
    assert_close(state, state_ref)
    if kind == "diffmoe" and not train:  # the dynamic capacity really varies per expert
        assert len(np.unique(np.asarray(aux["capacity"]))) > 1


@pytest.mark.parametrize("sizes", [(1, 1, 8), (2, 1, 4)])
def test_tokens_reach_experts_on_other_devices(sizes):
    """Route the tokens of each group's first device to the last expert, on its last device."""
    layer = moe.DiffMoE(E, F)
    variables = init(layer, tokens())
    router = np.zeros((D, E), np.float32)
    router[0, -1] = 4.0
    variables["params"]["router"] = jnp.asarray(router)
    groups, per_device = sizes[0] * sizes[1], B // 8
    first_devices = [g * B // groups + i for g in range(groups) for i in range(per_device)]
    x = np.array(tokens(3))
    x[:, :, 0] = 0.0
    x[first_devices, :, 0] = 3.0  # only these tokens score high for the last expert
    cotangent = jax.random.normal(jax.random.PRNGKey(7), x.shape)
    y_ref, tok_ref, _, state_ref, grads_ref = reference(layer, variables, x, True, cotangent,
                                                        groups)
    y, aux, state, grads = sharded(layer, variables, x, True, cotangent, sizes)
    dispatch = np.asarray(aux["dispatch"])
    chosen = np.flatnonzero(dispatch[:, -1])
    assert len(chosen) == groups * (B * S // groups // E)
    assert set(chosen // S) <= set(first_devices)
    assert_close(dispatch, tok_ref["dispatch"])
    assert_close((y, grads, state), (y_ref, grads_ref, state_ref))


def test_experts_not_divisible_by_the_expert_axis_is_a_clear_error():
    layer = moe.DiffMoE(6, F)
    x = tokens()
    variables = init(layer, x)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 1, "expert": 4})
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"num_experts=6 .*mesh.expert=4"):
        jax.jit(lambda v, x: layer.apply(v, x, True, mutable=["aux", "moe_state"]))(
            variables, x)
