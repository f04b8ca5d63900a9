"""Imports of the official Switch-DiT, DTR, DiffMoE, TC-DiT, EC-DiT and Dense-DiT checkpoints.

Each state dict is written out here from the official `models/*.py` module structure (names
and torch shapes), filled with random values, converted, and run against a NumPy forward pass
of the official computation (tests/reference_dit.py plus the routing and mixtures below).
"""
import flax.linen as nn
import jax
import numpy as np
import pytest

import reference_dit
from switch_dit_jax.models import build_model, convert

D, DEPTH, HEADS, PATCH, SIZE, CH, CLASSES, T = 32, 2, 2, 2, 8, 4, 10, 1000
E = 4  # experts of the MoE families
BASE = dict(name="custom", depth=DEPTH, hidden_size=D, num_heads=HEADS, patch_size=PATCH,
            input_size=SIZE, in_channels=CH, num_classes=CLASSES)
CONFIGS = {
    "dense_dit": BASE,
    "dtr": dict(BASE, routing=dict(kind="dtr", num_tasks=T)),
    "switch_dit": dict(BASE, routing=dict(kind="switch", num_tasks=T)),
    "diffmoe": dict(BASE, ffn=dict(kind="diffmoe", num_experts=E)),
    "tc_dit": dict(BASE, ffn=dict(kind="token_choice", num_experts=E, top_k=2)),
    "ec_dit": dict(BASE, ffn=dict(kind="expert_choice", num_experts=E)),
}
FUNCTIONS = {"dense_dit": convert.from_densedit_state_dict, "dtr": convert.from_dtr_state_dict,
             "switch_dit": convert.from_switchdit_state_dict,
             "diffmoe": convert.from_diffmoe_state_dict, "tc_dit": convert.from_tcdit_state_dict,
             "ec_dit": convert.from_ecdit_state_dict}
MOE_BLOCKS = (1,)  # the official interleave: odd blocks


def official_dtr_table(tasks, units, alpha, beta):
    """create_mask_tasks of the official taskrouting.py: a window of int(β·C) units."""
    table = np.zeros((tasks, units), np.float32)
    filled = int(units * beta)
    start = ((np.linspace(0, 1, tasks) ** alpha) * (units - filled)).round().astype(np.int64)
    for task in range(tasks):
        table[task, start[task]:start[task] + filled] = 1
    return table


def official_state_dict(family, seed=0, scale=0.2, shared_experts_keys=False, ch=CH,
                        patch=PATCH, size=SIZE):
    """Names, shapes and buffers of the official model of `family` for the tiny config (of
    another input with `ch`, `patch`, `size`)."""
    shapes = reference_dit.official_shapes(DEPTH, D, ch, patch, CLASSES, True, size)
    buffers = {}
    if family == "dtr":  # byeongjun-park/DTR: DiTBlock.routing = TaskRouter
        for i in range(DEPTH):
            buffers[f"blocks.{i}.routing._unit_mapping"] = official_dtr_table(T, D, 4.0, 0.8)
    if family == "switch_dit":  # routers = TaskMoE (f_gate, ParallelExperts), DiffusionPrior
        m = 3
        for i in range(DEPTH):
            shapes.update({f"routers.{i}.f_gate.1.weight": (m, D),
                           f"routers.{i}.f_gate.1.bias": (m,),
                           f"routers.{i}.experts.w": (m, D, D),
                           f"routers.{i}.experts.b": (m, D)})
        buffers["prior._unit_mapping"] = official_dtr_table(T, DEPTH * m, 4.0, 2 / 3)
        buffers["full_time"] = np.arange(T, dtype=np.float32)
    if family in ("diffmoe", "tc_dit", "ec_dit"):
        for i in MOE_BLOCKS:
            b = f"blocks.{i}.mlp."
            for fc in ("fc1", "fc2"):
                del shapes[b + fc + ".weight"], shapes[b + fc + ".bias"]
            for e in range(E):
                shapes.update({f"{b}experts.{e}.fc1.weight": (4 * D, D),
                               f"{b}experts.{e}.fc1.bias": (4 * D,),
                               f"{b}experts.{e}.fc2.weight": (D, 4 * D),
                               f"{b}experts.{e}.fc2.bias": (D,)})
            if family == "tc_dit":  # MoEGate.weight
                shapes[b + "gate.weight"] = (E, D)
                if shared_experts_keys:  # n_shared_experts=0: MoeMLP of intermediate size 0
                    buffers.update({b + "shared_experts.gate_proj.weight": np.zeros((0, D)),
                                    b + "shared_experts.up_proj.weight": np.zeros((0, D)),
                                    b + "shared_experts.down_proj.weight": np.zeros((D, 0))})
            else:
                shapes[b + "gate_weight"] = (E, D)
            if family == "diffmoe":
                shapes.update({b + "capacity_predictor.0.weight": (D, D),
                               b + "capacity_predictor.0.bias": (D,),
                               b + "capacity_predictor.2.weight": (E, D),
                               b + "capacity_predictor.2.bias": (E,)})
                rng = np.random.default_rng(seed + 100)
                buffers[b + "expert_threshold"] = rng.uniform(0.3, 0.7, E).astype(np.float32)
                buffers[b + "ema_decay"] = np.array([0.95], np.float32)
    sd = reference_dit.random_state_dict(shapes, seed=seed, scale=scale)
    sd.update({k: np.asarray(v, np.float32) for k, v in buffers.items()})
    return sd


# ---------------------------------------------------------------- NumPy official computation

def _lin(sd, name, x, bias=True):
    return x @ sd[name + ".weight"].T + (sd[name + ".bias"] if bias else 0)


def _mlp(sd, name, x):
    h = _lin(sd, name + ".fc1", x)
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    return _lin(sd, name + ".fc2", h)


def _softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _diffmoe_eval(sd, b, h):
    """SparseMoEBlock.forward_eval: expert e takes its #(σ(pred) > τ_e) best-scored tokens."""
    pool = h.reshape(-1, D)
    hidden = _silu(_lin(sd, b + "capacity_predictor.0", pool))
    pred = 1 / (1 + np.exp(-_lin(sd, b + "capacity_predictor.2", hidden)))
    scores = _softmax(pool @ sd[b + "gate_weight"].T)
    y = np.zeros_like(pool)
    for e in range(E):
        k = int(np.sum(pred[:, e] > sd[b + "expert_threshold"][e]))
        index = np.argsort(-scores[:, e])[:k]
        y[index] += scores[index, e, None] * _mlp(sd, f"{b}experts.{e}", pool[index])
    return y.reshape(h.shape)


def _silu(x):
    return x / (1 + np.exp(-x))


def _tc(sd, b, h, top_k=2):
    """TC-DiT: each token's top-k experts, weighted by their unnormalised softmax scores."""
    pool = h.reshape(-1, D)
    scores = _softmax(pool @ sd[b + "gate.weight"].T)
    y = np.zeros_like(pool)
    for p in range(pool.shape[0]):
        for e in np.argsort(-scores[p])[:top_k]:
            y[p] += scores[p, e] * _mlp(sd, f"{b}experts.{e}", pool[p:p + 1])[0]
    return y.reshape(h.shape)


def _ec(sd, b, h, capacity=1.0):
    """EC-DiT: within each sample every expert takes its top int(S/E·C) tokens."""
    out = np.zeros_like(h)
    k = int(h.shape[1] / E * capacity)
    for n in range(h.shape[0]):
        affinity = _softmax(h[n] @ sd[b + "gate_weight"].T)
        for e in range(E):
            index = np.argsort(-affinity[:, e])[:k]
            out[n, index] += affinity[index, e, None] * _mlp(sd, f"{b}experts.{e}", h[n, index])
    return out


def _switch_mask(sd, i, tok, t):
    """TaskMoE: gates softmax(Linear(SiLU(e_t))) of the sample's t, top-2 raw values;
    m = 1 + Σ g_j (z W_j + b_j)."""
    temb_all = reference_dit.timestep_embed(sd, np.arange(T))
    probs = _softmax(_lin(sd, f"routers.{i}.f_gate.1", _silu(temb_all)))[t]
    mask = np.ones_like(tok)
    for n in range(tok.shape[0]):
        for j in np.argsort(-probs[n])[:2]:
            mask[n] += probs[n, j] * (tok[n] @ sd[f"routers.{i}.experts.w"][j]
                                      + sd[f"routers.{i}.experts.b"][j])
    return mask


def reference(family, sd, x, t, y):
    mask = ffn = None
    if family == "dtr":
        mask = lambda i, tok: sd[f"blocks.{i}.routing._unit_mapping"][t][:, None]  # noqa: E731
    if family == "switch_dit":
        mask = lambda i, tok: _switch_mask(sd, i, tok, t)  # noqa: E731
    moe = {"diffmoe": _diffmoe_eval, "tc_dit": _tc, "ec_dit": _ec}.get(family)
    if moe is not None:
        ffn = lambda i, h: moe(sd, f"blocks.{i}.mlp.", h) if i in MOE_BLOCKS else None  # noqa
    return reference_dit.forward(sd, x.transpose(0, 3, 1, 2), t, y, DEPTH, HEADS, PATCH, 2 * CH,
                                 mask=mask, ffn=ffn).transpose(0, 2, 3, 1)


# --------------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("family", [f for f in CONFIGS if f != "dense_dit"])
def test_official_state_dict_imports_and_runs_as_the_official_model(family):
    sd = official_state_dict(family)
    variables = FUNCTIONS[family](sd, CONFIGS[family])
    model = build_model(CONFIGS[family])
    init = nn.unbox(jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), np.zeros((1, SIZE, SIZE, CH)), np.zeros(1), np.zeros(1, np.int32))))
    for collection in ("params", "moe_state"):  # every variable filled, with its shape
        want = jax.tree.map(lambda v: tuple(v.shape), init.get(collection, {}))
        got = jax.tree.map(lambda v: tuple(v.shape), variables.get(collection, {}))
        assert got == want, collection
    # Every official tensor used once: the imported sizes are those of the state dict less the
    # tables this package computes itself (pos_embed, DTR masks, prior map, timestep list).
    computed = {"pos_embed", "prior._unit_mapping", "full_time"} | {
        k for k in sd if k.endswith(("_unit_mapping", "ema_decay"))}
    assert sum(v.size for v in jax.tree.leaves(variables)) == \
        sum(v.size for k, v in sd.items() if k not in computed)

    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, SIZE, SIZE, CH)).astype(np.float32)
    t, y = np.array([0, 400, 999]), np.array([2, 9, CLASSES])
    out = np.asarray(jax.jit(model.apply)(variables, x, t, y))
    ref = reference(family, sd, x, t, y)
    # As in test_dit: float32 sin/cos of t ~ 1000 differ by ~6e-5 between XLA and NumPy; a
    # wrong layout, order or routing gives O(1) differences.
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    assert np.abs(ref).mean() > 1e-2


def test_dense_dit_imports_as_the_tested_dit_import():
    """Dense-DiT has facebookresearch/DiT's layout, whose import test_dit checks numerically."""
    sd = official_state_dict("dense_dit", seed=5)
    variables = convert.from_densedit_state_dict(sd, BASE)
    assert set(variables) == {"params"}
    assert jax.tree.all(jax.tree.map(np.array_equal, variables["params"],
                                     convert.from_torch_state_dict(sd, BASE)))
    np.testing.assert_array_equal(variables["params"]["blocks_1"]["attn"]["qkv"]["kernel"],
                                  sd["blocks.1.attn.qkv.weight"].T)


def test_diffmoe_thresholds_import_as_model_state():
    sd = official_state_dict("diffmoe", seed=3)
    variables = convert.from_diffmoe_state_dict(sd, CONFIGS["diffmoe"])
    np.testing.assert_array_equal(variables["moe_state"]["blocks_1"]["mlp"]["threshold"],
                                  sd["blocks.1.mlp.expert_threshold"])
    np.testing.assert_array_equal(variables["params"]["blocks_1"]["mlp"]["experts"][
        "fc2_kernel"][2], sd["blocks.1.mlp.experts.2.fc2.weight"].T)
    np.testing.assert_array_equal(variables["params"]["blocks_1"]["mlp"]["router"],
                                  sd["blocks.1.mlp.gate_weight"].T)


def test_tc_dit_empty_shared_experts_are_used_up():
    sd = official_state_dict("tc_dit", shared_experts_keys=True)
    plain = convert.from_tcdit_state_dict(official_state_dict("tc_dit"), CONFIGS["tc_dit"])
    with_empty = convert.from_tcdit_state_dict(sd, CONFIGS["tc_dit"])
    assert jax.tree.all(jax.tree.map(np.array_equal, plain, with_empty))
    sd["blocks.1.mlp.shared_experts.up_proj.weight"] = np.ones((64, D), np.float32)
    with pytest.raises(ValueError, match=r"'blocks\.1\.mlp\.shared_experts\.up_proj\.weight'"
                                         r".*no shared experts"):
        convert.from_tcdit_state_dict(sd, CONFIGS["tc_dit"])


# A key of each family's own layout: renamed, it must be refused by name; mis-shaped too.
OWN_KEY = {"dense_dit": "blocks.1.mlp.fc1.weight", "dtr": "blocks.1.routing._unit_mapping",
           "switch_dit": "routers.1.experts.w",
           "diffmoe": "blocks.1.mlp.capacity_predictor.2.weight",
           "tc_dit": "blocks.1.mlp.gate.weight", "ec_dit": "blocks.1.mlp.experts.3.fc2.bias"}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_wrong_key_is_refused_by_name(family):
    sd = official_state_dict(family)
    key = OWN_KEY[family]
    sd[key.replace("1", "7", 1)] = sd.pop(key)
    with pytest.raises(ValueError, match=rf"missing official key '{key}'.*{family_repo(family)}"):
        FUNCTIONS[family](sd, CONFIGS[family])


@pytest.mark.parametrize("family", list(CONFIGS))
def test_wrong_shape_is_refused_by_name(family):
    sd = official_state_dict(family)
    key = OWN_KEY[family]
    sd[key] = sd[key][..., :-1]
    with pytest.raises(ValueError, match=rf"'{key}'.*shape"):
        FUNCTIONS[family](sd, CONFIGS[family])


def family_repo(family):
    return {"dense_dit": "Dense-DiT", "dtr": "DTR", "switch_dit": "Switch-DiT",
            "diffmoe": "DiffMoE", "tc_dit": "TC-DiT", "ec_dit": "EC-DiT"}[family]


@pytest.mark.parametrize("family, config, pattern", [
    # checkpoint trained with other tables or other routing / mixture placement than the config
    ("dtr", dict(CONFIGS["dtr"], routing=dict(kind="dtr", num_tasks=T, alpha=2.0)),
     r"'blocks\.0\.routing\._unit_mapping' differs .*alpha"),
    ("switch_dit", dict(CONFIGS["switch_dit"], routing=dict(kind="switch", num_tasks=T,
                                                              top_k=1)),
     r"'prior\._unit_mapping' differs .*top_k"),
    ("switch_dit", dict(CONFIGS["switch_dit"], routing=dict(kind="switch", num_tasks=T,
                                                              integration="mask_skip")),
     r"model\.routing\.integration='mask_skip'.*mask_skip_init"),
    ("diffmoe", dict(BASE, ffn=dict(kind="diffmoe", num_experts=E, threshold_decay=0.9)),
     r"'blocks\.1\.mlp\.ema_decay' differs .*threshold_decay"),
    ("diffmoe", dict(BASE, ffn=dict(kind="diffmoe", num_experts=E, first=0, every=1)),
     r"missing official key 'blocks\.0\.mlp\..*first=0, every=1"),
    ("ec_dit", dict(BASE, ffn=dict(kind="expert_choice", num_experts=2)),
     r"unexpected key 'blocks\.1\.mlp\.experts\.2\.fc1\.bias'"),
    ("tc_dit", CONFIGS["ec_dit"], r"model\.ffn\.kind='expert_choice'.*'token_choice'"),
    ("dtr", BASE, r"model\.routing\.kind='none'.*\['dtr'\]"),
])
def test_checkpoint_of_another_config_is_refused(family, config, pattern):
    with pytest.raises(ValueError, match=pattern):
        FUNCTIONS[family](official_state_dict(family), config)


def test_switch_dit_repository_dtr_layout_and_unknown_family():
    sd = official_state_dict("dtr")
    sd = {k.replace("blocks.", "routers.").replace(".routing.", ".") if "_unit_mapping" in k
          else k: v for k, v in sd.items()}  # the Switch-DiT repo's DTR: routers.i._unit_mapping
    variables = convert.from_switchdit_state_dict(sd, CONFIGS["dtr"])
    assert set(variables["params"]) == set(convert.from_dtr_state_dict(
        official_state_dict("dtr"), CONFIGS["dtr"])["params"])
    with pytest.raises(ValueError, match="family 'mmdit' is unknown"):
        convert.from_official_state_dict(sd, CONFIGS["dtr"], "mmdit")
