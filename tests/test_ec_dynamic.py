"""EC-DiT with dynamic intra-sample routing (DiffMoE Table 8): per-sample capacities from the
capacity predictor and thresholds, against a NumPy count of the definition."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switch_dit_jax.models import build_model, moe_baselines

B, S, D, F, E = 3, 8, 8, 16, 4


def _predicted(params, x):
    p = params["params"]
    h = x.reshape(-1, D) @ p["capacity_fc1"]["kernel"] + p["capacity_fc1"]["bias"]
    h = h * jax.nn.sigmoid(h)
    return jax.nn.sigmoid(h @ p["capacity_fc2"]["kernel"] + p["capacity_fc2"]["bias"])


def setup():
    layer = moe_baselines.ExpertChoiceMoE(E, F, capacity=1.0, dynamic=True, threshold_decay=0.9)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, S, D))
    variables = nn.unbox(layer.init(jax.random.PRNGKey(1), x))
    return layer, x, {k: v for k, v in variables.items() if k != "aux"}


def test_training_dispatches_k_per_sample_and_moves_the_thresholds_to_the_kth_score():
    layer, x, params = setup()
    _, out = layer.apply(params, x, train=True, mutable=["aux", "moe_state"])
    dispatch = np.asarray(out["aux"]["dispatch"][0]).reshape(B, S, E)
    k = int(S / E * 1.0)
    np.testing.assert_array_equal(dispatch.sum(1), k)  # K' tokens per expert in every sample
    pred = np.asarray(_predicted(params, x)).reshape(B, S, E)
    kth = np.sort(pred, axis=1)[:, ::-1][:, k - 1].mean(0)  # mean over samples of the K'-th
    np.testing.assert_allclose(out["moe_state"]["threshold"], 0.1 * kth, rtol=1e-5)


@pytest.mark.parametrize("tau", [0.0, 0.45, 0.5, 0.55, 1.0])
def test_inference_capacity_counts_each_samples_tokens_above_the_threshold(tau):
    layer, x, params = setup()
    variables = {**params, "moe_state": {"threshold": jnp.full((E,), tau)}}
    _, out = layer.apply(variables, x, mutable=["aux"])
    pred = np.asarray(_predicted(params, x)).reshape(B, S, E)
    counts = (pred > tau).sum(1)  # [B, E]: tokens expert e takes in sample b
    np.testing.assert_allclose(out["aux"]["capacity"][0], counts.mean(0) * E / S, rtol=1e-6)


def test_config_builds_the_dynamic_layer_and_refuses_an_unknown_mode():
    model = build_model({"name": "DiT-S/2", "ffn": {"kind": "expert_choice",
                                                     "ec_inference": "dynamic"}})
    assert model.ffn["ec_inference"] == "dynamic"
    with pytest.raises(ValueError, match="model.ffn.ec_inference"):
        build_model({"name": "DiT-S/2", "ffn": {"kind": "expert_choice", "ec_inference": "x"}})
