"""The text-to-image DiT (DTR Appendix C, Figure 8): cross-attention against a NumPy reference,
padding invariance, the zero-output start, composition with the routing and mixture methods,
caption dropout, CFG with the empty caption, the sharded step, and sampling from prompts."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

import test_train
from fake_text import FakeEncoder
from switch_dit_jax import parallel, sample
from switch_dit_jax.config_base import get_base_config
from switch_dit_jax.data.captions import prompt_digits
from switch_dit_jax.diffusion.guidance import guided_fn
from switch_dit_jax.models import build_model, example_condition
from switch_dit_jax.models.layers import CrossAttention
from switch_dit_jax.train import loop
from switch_dit_jax.train.state import create_train_state, make_optimizer, state_shardings
from switch_dit_jax.train.step import drop_conditions, make_diffusion, make_train_step
from switch_dit_jax.validation import ConfigError, validate_config

L, DT = 6, 5


def model_config(**kw):
    c = dict(name="custom", depth=2, hidden_size=32, num_heads=4, patch_size=4, input_size=8,
             in_channels=1, num_classes=1, conditioning="text", text_width=DT, text_length=L,
             attention_impl="xla")
    c.update(kw)
    return c


def text_condition(rng, batch, lengths):
    text = rng.standard_normal((batch, L, DT)).astype(np.float32)
    mask = np.arange(L)[None] < np.asarray(lengths)[:, None]
    return {"text": text, "text_mask": mask}


def randomized(params, seed=0, scale=0.2):
    """Every parameter replaced by noise: zero-initialised layers (adaLN, the cross-attention
    output) would otherwise hide what a test looks for."""
    flat = flatten_dict(jax.device_get(nn.unbox(params)))
    rng = np.random.default_rng(seed)
    return unflatten_dict({k: rng.standard_normal(np.shape(v)).astype(np.float32) * scale
                           for k, v in flat.items()})


def init(model, seed=0):
    x = jnp.zeros((1, model.input_size, model.input_size, model.in_channels))
    return nn.unbox(model.init(jax.random.PRNGKey(seed), x, jnp.zeros((1,)),
                               example_condition(model))["params"])


def test_cross_attention_matches_numpy_with_padding_masked():
    rng = np.random.default_rng(1)
    b, s, d, heads = 2, 3, 8, 2
    x = rng.standard_normal((b, s, d)).astype(np.float32)
    cond = text_condition(rng, b, [2, 6])
    layer = CrossAttention(heads)
    params = randomized(layer.init(jax.random.PRNGKey(0), x, cond["text"], cond["text_mask"]))
    got = layer.apply(params, x, cond["text"], cond["text_mask"])
    p = params["params"]
    q = x @ p["q"]["kernel"] + p["q"]["bias"]
    kv = cond["text"] @ p["kv"]["kernel"] + p["kv"]["bias"]
    hd = d // heads
    want = np.zeros((b, s, d), np.float32)
    for i in range(b):
        n = int(cond["text_mask"][i].sum())
        for h in range(heads):
            qh = q[i, :, h * hd:(h + 1) * hd]
            kh = kv[i, :n, h * hd:(h + 1) * hd]          # kv layout: [2, heads, head_dim]
            vh = kv[i, :n, d + h * hd:d + (h + 1) * hd]
            logits = qh @ kh.T / np.sqrt(hd)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            want[i, :, h * hd:(h + 1) * hd] = (w / w.sum(-1, keepdims=True)) @ vh
    want = want @ p["proj"]["kernel"] + p["proj"]["bias"]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_padding_tokens_do_not_change_the_output():
    model = build_model(model_config())
    params = randomized(init(model))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 8, 8, 1)).astype(np.float32)
    t = np.array([3, 500, 999])
    cond = text_condition(rng, 3, [2, 4, 6])
    out = model.apply({"params": params}, x, t, cond)
    changed = dict(cond, text=np.where(cond["text_mask"][..., None], cond["text"],
                                       rng.standard_normal(cond["text"].shape) * 50))
    np.testing.assert_allclose(model.apply({"params": params}, x, t, changed), out,
                               rtol=1e-5, atol=1e-5)
    real = dict(cond, text=cond["text"] + 1.0 * cond["text_mask"][..., None])
    assert np.abs(model.apply({"params": params}, x, t, real) - out).max() > 1e-3


@pytest.mark.parametrize("routing", ["none", "dtr"])
def test_zero_cross_attention_output_gives_the_class_free_dit_block(routing):
    """With the cross-attention output projection at zero, a text DiT is the unconditional DiT
    whose one-row label table is zero: the same blocks, adaLN from the timestep alone."""
    text_model = build_model(model_config(routing={"kind": routing}))
    plain = build_model(model_config(conditioning="class", routing={"kind": routing}))
    params = randomized(init(text_model), seed=3)
    for i in range(2):
        proj = params[f"blocks_{i}"]["cross_attn"]["proj"]
        proj["kernel"], proj["bias"] = np.zeros_like(proj["kernel"]), np.zeros_like(proj["bias"])
    plain_params = {k: v for k, v in params.items()}
    plain_params["blocks_0"] = {k: v for k, v in params["blocks_0"].items() if k != "cross_attn"}
    plain_params["blocks_1"] = {k: v for k, v in params["blocks_1"].items() if k != "cross_attn"}
    plain_params["y_embedder"] = {"embedding_table": np.zeros((1, 32), np.float32)}
    assert set(flatten_dict(init(plain))) == set(flatten_dict(plain_params))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 8, 8, 1)).astype(np.float32)
    t = np.array([10, 900])
    got = text_model.apply({"params": params}, x, t, text_condition(rng, 2, [3, 6]))
    want = plain.apply({"params": plain_params}, x, t, np.zeros(2, np.int32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # A fresh model starts there too: its cross-attention output projections are zero.
    fresh = init(text_model)
    assert not np.any(fresh["blocks_0"]["cross_attn"]["proj"]["kernel"])


def tiny_config(**model):
    c = get_base_config()
    c.model.update(model_config(**model))
    c.model.learn_sigma = True
    c.data.name = "digits_text"
    c.text.encoder_dir = "/unused"
    c.train.global_batch_size = 8
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 0
    c.train.sample_every = 0
    return c


def null_condition():
    return {"text": np.full((L, DT), 0.5, np.float32), "text_mask": np.arange(L) < 2}


def train_batch(seed=5):
    rng = np.random.default_rng(seed)
    cond = text_condition(rng, 8, [2, 3, 4, 5, 6, 2, 3, 4])
    return {"image": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32), **cond}


@pytest.mark.parametrize("method", [
    {"routing": {"kind": "dtr"}},
    {"routing": {"kind": "switch"}},
    {"ffn": {"kind": "diffmoe", "num_experts": 4}},
    {"ffn": {"kind": "token_choice", "num_experts": 4}},
])
def test_text_conditioning_composes_with_routing_and_mixtures(method):
    config = tiny_config(**method)
    model = build_model(config.model)
    tx = make_optimizer(config.train)
    step = jax.jit(make_train_step(model, make_diffusion(config), tx, config, null_condition()))
    mesh = parallel.make_mesh(dict(data=1, fsdp=1, expert=1), jax.devices()[:1])
    state = create_train_state(model, tx, jax.random.PRNGKey(0), mesh)
    before = jax.device_get(state.params)
    with jax.set_mesh(mesh):
        for _ in range(3):
            state, metrics = step(state, train_batch(), jax.random.PRNGKey(1))
    assert np.isfinite(metrics["loss"])
    after = jax.device_get(state.params)
    # The text reaches the loss: the cross-attention weights moved. (Step 1 moves only the
    # zero-initialised final layer, step 2 the zero output projection, step 3 the keys and
    # values, as each zero layer opens the gradient path to the one before it.)
    for name in ("proj", "kv"):
        assert np.abs(after["blocks_1"]["cross_attn"][name]["kernel"]
                      - before["blocks_1"]["cross_attn"][name]["kernel"]).max() > 0


def test_caption_dropout_replaces_exactly_the_drawn_samples_with_the_null_caption():
    rng = np.random.default_rng(6)
    cond = text_condition(rng, 512, rng.integers(1, L + 1, 512))
    null = null_condition()
    key = jax.random.PRNGKey(7)
    out = jax.device_get(drop_conditions(key, cond, null, 0.25))
    is_null = np.all(out["text"] == null["text"], axis=(1, 2))
    kept = np.all(out["text"] == cond["text"], axis=(1, 2))
    assert np.all(is_null ^ kept)
    np.testing.assert_array_equal(out["text_mask"][is_null], np.broadcast_to(
        null["text_mask"], (is_null.sum(), L)))
    np.testing.assert_array_equal(out["text_mask"][kept], cond["text_mask"][kept])
    assert 0.19 < is_null.mean() < 0.31
    # The draw is the labels' draw: the same key drops the same samples of a class batch.
    labels = jax.device_get(drop_conditions(key, np.zeros(512, np.int32), 10, 0.25))
    np.testing.assert_array_equal(labels == 10, is_null)


def test_cfg_with_text_uses_the_empty_caption_in_both_pool_forms():
    model = build_model(model_config())
    params = randomized(init(model))
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 8, 8, 1)).astype(np.float32)
    t = np.array([100, 700])
    cond, null = text_condition(rng, 2, [3, 5]), null_condition()
    apply_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)  # noqa: E731
    c = apply_fn(x, t, cond)
    u = apply_fn(x, t, jax.tree.map(lambda a: np.broadcast_to(a, (2,) + a.shape), null))
    want = np.concatenate([u[..., :1] + 1.5 * (c[..., :1] - u[..., :1]), c[..., 1:]], -1)
    for pool in ("separate", "joint"):
        got = guided_fn(apply_fn, cond, null, 1.5, pool=pool)(x, t)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sharded_text_step_on_8_devices_matches_1_device():
    config = tiny_config(routing={"kind": "dtr"})
    config.model.hidden_size = 64
    model = build_model(config.model)
    tx = make_optimizer(config.train)
    step_fn = make_train_step(model, make_diffusion(config), tx, config, null_condition())
    results = test_train.steps_on_1_and_8_devices(model, tx, step_fn, train_batch(), 2)
    assert np.isfinite(results[0][1]["loss"])
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5)


def test_sampling_from_a_prompt_file_writes_images_prompts_and_a_captioned_grid(tmp_path):
    encoder = FakeEncoder(width=DT, max_length=L)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten seven\n\nthe number 3\n")
    config = tiny_config()
    config.sample.prompts = str(prompts)
    config.sample.num_samples = 5
    config.sample.batch_size = 8
    config.sample.num_steps = 3
    config.sample.cfg_scale = 1.5
    model = build_model(config.model)
    tx = make_optimizer(config.train)
    mesh = parallel.make_mesh(dict(data=1, fsdp=-1, expert=1))
    _, shardings = state_shardings(model, tx, mesh)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), mesh)
    images, names = sample.generate(model, config, state.ema_params, state.ema_model_state,
                                    mesh, shardings.ema_params, text_encoder=encoder)
    assert images.shape == (5, 8, 8, 1) and np.isfinite(images).all()
    assert list(names) == ["a handwritten seven", "the number 3"] * 2 + ["a handwritten seven"]
    np.testing.assert_array_equal(prompt_digits(names), [7, 3, 7, 3, 7])
    # Same prompts, same seed: the samples of equal prompts differ only by their noise, and a
    # rerun repeats them exactly.
    again, _ = sample.generate(model, config, state.ema_params, state.ema_model_state, mesh,
                               shardings.ema_params, text_encoder=encoder)
    np.testing.assert_array_equal(again, images)

    original = sample.generate
    sample.generate = lambda *a, **k: original(*a, **k, text_encoder=encoder)
    try:
        paths = loop.write_samples(model, config, state, mesh, shardings, str(tmp_path))
    finally:
        sample.generate = original
    saved = np.load(paths["npz"])
    assert set(saved.files) == {"arr_0", "prompts"} and saved["arr_0"].dtype == np.uint8
    assert list(saved["prompts"][:2]) == ["a handwritten seven", "the number 3"]
    from PIL import Image
    with Image.open(paths["png"]) as png:
        assert png.size[0] > 300  # a matplotlib figure with captions, not a bare 8x8 grid


def test_text_configs_are_checked_in_one_sentence(tmp_path):
    config = tiny_config()
    config.train.sample_every = 100
    with pytest.raises(ConfigError, match="samples from prompts: set config.sample.prompts"):
        validate_config(config, 1)
    config.sample.prompts = str(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="missing.txt' is not a file"):
        validate_config(config, 1)
    config = tiny_config()
    config.data.name = "digits"
    with pytest.raises(ConfigError, match="conditioning='text' needs captioned data"):
        validate_config(config, 1)
    config = tiny_config(conditioning="class", num_classes=10)
    with pytest.raises(ConfigError, match="digits_text' yields captions"):
        validate_config(config, 1)
    with pytest.raises(ValueError, match="model.text_width=0 must be a positive integer"):
        build_model(model_config(text_width=0))
    model = build_model(model_config())
    with pytest.raises(ValueError, match="takes y=.*not class labels"):
        init_labels = jnp.zeros((1,), jnp.int32)
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)), init_labels)
    with pytest.raises(ValueError, match=r"text condition of shape \(1, 6, 7\).*model.text_width"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)),
                   {"text": jnp.zeros((1, L, 7)), "text_mask": jnp.ones((1, L), bool)})
