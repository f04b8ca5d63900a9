"""Imports of official DiffMoE-repository checkpoints trained with use_swiglu: every FFN is a
bias-free MoeMLP (gate_proj, up_proj: [r·D, D]; down_proj: [D, r·D], torch Linear layout),
dense blocks and experts alike (models_DiffMoE.py / models_DiT.py)."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from switch_dit_jax.models import build_model, convert

from test_convert_families import CONFIGS, D, DEPTH, E, official_state_dict

H = 4 * D
PROJ = {"gate_proj": (H, D), "up_proj": (H, D), "down_proj": (D, H)}


def swiglu_state_dict(family, seed=0):
    sd = official_state_dict(family, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for key in [k for k in sd if ".fc1." in k or ".fc2." in k]:
        del sd[key]
    prefixes = [f"blocks.{i}.mlp" for i in range(DEPTH) if i % 2 == 0 or family == "dense_dit"]
    prefixes += [f"blocks.{i}.mlp.experts.{e}" for i in range(1, DEPTH, 2) for e in range(E)
                 if family != "dense_dit"]
    for prefix in prefixes:
        for proj, shape in PROJ.items():
            sd[f"{prefix}.{proj}.weight"] = rng.normal(0, 0.2, shape).astype(np.float32)
    return sd


def config(family):
    base = CONFIGS[family]
    return dict(base, ffn=dict(base.get("ffn", {}), swiglu=True))


FUNCTIONS = {"diffmoe": convert.from_diffmoe_state_dict,
             "dense_dit": convert.from_densedit_state_dict}


@pytest.mark.parametrize("family", list(FUNCTIONS))
def test_swiglu_weights_land_transposed_and_the_model_runs(family):
    sd = swiglu_state_dict(family)
    variables = FUNCTIONS[family](sd, config(family))
    params = nn.unbox(variables["params"]) if "params" in variables else nn.unbox(variables)
    for proj in PROJ:
        np.testing.assert_array_equal(params["blocks_0"]["mlp"][proj]["kernel"],
                                      sd[f"blocks.0.mlp.{proj}.weight"].T)
        if family == "diffmoe":
            stacked = params["blocks_1"]["mlp"]["experts"][f"{proj.split('_')[0]}_kernel"]
            for e in range(E):
                np.testing.assert_array_equal(
                    stacked[e], sd[f"blocks.1.mlp.experts.{e}.{proj}.weight"].T)
    model = build_model(config(family))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    out = model.apply({"params": params, **{k: v for k, v in variables.items()
                                            if k != "params"}}, x, np.array([3, 700]),
                      np.array([1, 2]))
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("key", ["blocks.0.mlp.up_proj.weight",
                                 "blocks.1.mlp.experts.2.down_proj.weight"])
def test_wrong_swiglu_key_or_shape_is_refused_by_name(key):
    sd = swiglu_state_dict("diffmoe")
    bad = dict(sd)
    bad[key.replace("proj", "prj")] = bad.pop(key)
    with pytest.raises(ValueError, match=rf"missing official key '{key}'"):
        convert.from_diffmoe_state_dict(bad, config("diffmoe"))
    bad = dict(sd)
    bad[key] = bad[key][..., :-1]
    with pytest.raises(ValueError, match=rf"'{key}'.*shape"):
        convert.from_diffmoe_state_dict(bad, config("diffmoe"))


def test_swiglu_config_is_refused_for_a_gelu_repository():
    with pytest.raises(ValueError, match="model.ffn.swiglu"):
        convert.from_dtr_state_dict(official_state_dict("dtr"),
                                    dict(CONFIGS["dtr"], ffn=dict(swiglu=True)))
