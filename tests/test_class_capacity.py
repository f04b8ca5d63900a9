"""DiffMoE per-class compute (Figs. 13-14): per-image shares, their ranking and the picture."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from switch_dit_jax.analysis import class_capacity
from switch_dit_jax.models import moe


def _silu(x):
    return x / (1 + np.exp(-x))


def test_sample_capacity_is_each_images_processed_tokens():
    """Σ_e (tokens of the image that expert e processed) / S, recomputed from the paper's rule:
    expert e processes its #(σ(pred_e) > τ_e) best-scored tokens of the pool."""
    b, s, d, e = 3, 8, 16, 4
    layer = moe.DiffMoE(e, 32)
    x = jax.random.normal(jax.random.PRNGKey(0), (b, s, d))
    shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(1), x))["params"]
    rng = np.random.default_rng(0)
    p = jax.tree.map(lambda v: rng.normal(0, 0.5, v.shape).astype(np.float32), shapes)
    tau = np.array([0.3, 0.45, 0.5, 0.6], np.float32)
    _, aux = jax.jit(lambda v, x: layer.apply(v, x, mutable=["aux"]))(
        {"params": p, "moe_state": {"threshold": jnp.asarray(tau)}}, x)
    got = np.asarray(aux["aux"]["sample_capacity"][0])

    pool = np.asarray(x, np.float64).reshape(b * s, d)
    logits = pool @ p["router"]
    scores = np.exp(logits - logits.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    hidden = _silu(pool @ p["capacity_fc1"]["kernel"] + p["capacity_fc1"]["bias"])
    pred = 1 / (1 + np.exp(-(hidden @ p["capacity_fc2"]["kernel"] + p["capacity_fc2"]["bias"])))
    processed = np.zeros((b * s, e))
    for j in range(e):
        k = int(np.sum(pred[:, j] > tau[j]))
        processed[np.argsort(-scores[:, j])[:k], j] = 1
    want = processed.sum(1).reshape(b, s).sum(1) / s
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len(np.unique(want)) > 1  # the images really differ
    # Their mean is the layer's C_infer = mean_e C^E (Eq. 9).
    assert got.mean() == pytest.approx(float(np.mean(aux["aux"]["capacity"][0])), rel=1e-6)


def test_recorder_averages_guided_passes_and_ranking_orders_classes():
    rec = class_capacity.SampleCapacityRecorder()
    # Two layers, 2 images; at t=5 a joint guided call [cond | uncond], at t=3 two separate ones.
    rec(5.0, None, np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]]))
    rec(3.0, None, np.array([[0.0, 1.0], [0.0, 1.0]]))
    rec(3.0, None, np.array([[2.0, 1.0], [2.0, 1.0]]))
    per_image = rec.per_image(batch=2)
    np.testing.assert_allclose(per_image, [(2.0 + 1.0) / 2, (3.0 + 1.0) / 2])
    ranking = class_capacity.class_ranking(np.array([0.2, 0.9, 0.5, 0.7]),
                                           np.array([0, 1, 2, 2]), ["a", "b", "c"])
    assert [(r["class"], r["name"]) for r in ranking] == [(1, "b"), (2, "c"), (0, "a")]
    assert ranking[1]["c_infer_avg"] == pytest.approx(0.6)
    empty = class_capacity.SampleCapacityRecorder()
    empty(1.0, None, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="no dynamic DiffMoE layer"):
        empty.per_image(2)


def test_class_ranking_png_from_an_imported_official_checkpoint(tmp_path):
    """A tiny official DiffMoE checkpoint (test_convert_families' layout, thresholds in
    (0.3, 0.7) as a trained model has them) imported as a run's checkpoint, then ranked."""
    import test_convert_families
    import test_train
    from switch_dit_jax.train import import_official, loop

    config = test_train.tiny_config(**{
        "model.depth": 2, "model.ffn.kind": "diffmoe", "model.ffn.num_experts": 4,
        "sample.num_steps": 3, "sample.sampler": "ddim"})
    sd = test_convert_families.official_state_dict("diffmoe", seed=4, scale=0.1, ch=1,
                                                   patch=4)
    # A predictor whose probabilities spread around the thresholds, as a trained one's do.
    sd["blocks.1.mlp.capacity_predictor.2.weight"] *= 20
    weights = str(tmp_path / "ema.npz")
    np.savez(weights, **sd)
    workdir = str(tmp_path / "run")
    assert import_official.import_to_workdir(config, workdir, "diffmoe", weights, step=7) == 7
    with pytest.raises(ValueError, match="already holds the checkpoint of step 7"):
        import_official.import_to_workdir(config, workdir, "diffmoe", weights, step=8)

    model, mesh, state, shardings = loop.restore_latest(config, workdir)
    assert int(state.step) == 7
    np.testing.assert_array_equal(state.ema_model_state["moe_state"]["blocks_1"]["mlp"][
        "threshold"], sd["blocks.1.mlp.expert_threshold"])
    np.testing.assert_array_equal(state.params["blocks_1"]["mlp"]["router"],
                                  sd["blocks.1.mlp.gate_weight"].T)
    names = tmp_path / "names.txt"
    names.write_text("".join(f"digit {i}\n" for i in range(10)))
    ranking = class_capacity.report(model, config, state, mesh, shardings, str(tmp_path / "a"),
                                    str(names))
    assert sorted(r["class"] for r in ranking) == list(range(10))
    assert {r["name"] for r in ranking} == {f"digit {i}" for i in range(10)}
    values = [r["c_infer_avg"] for r in ranking]
    assert values == sorted(values, reverse=True) and 0 <= min(values) <= max(values) <= 4
    assert max(values) > min(values)  # the classes' images really got different compute
    saved = json.loads((tmp_path / "a" / "class_capacity.json").read_text())
    assert saved["step"] == 7 and saved["classes"] == ranking
    width, height = Image.open(tmp_path / "a" / "class_capacity.png").size
    assert width > 1000 and height > 400
    names.write_text("zero\none\n")
    with pytest.raises(ValueError, match="has 2 names but the model has 10 classes"):
        class_capacity.report(model, config, state, mesh, shardings, str(tmp_path / "b"),
                              str(names))
