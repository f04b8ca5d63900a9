"""ADM end to end: uint8 pixel records, the paper configs, the sharded train step, exact
resume and sampling to ADM-format .npz, all through the code the DiT uses."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import reference_adm as ref
import test_train
from switch_dit_jax import parallel
from switch_dit_jax.config_base import load_config
from switch_dit_jax.data import pixels
from switch_dit_jax.data.pipeline import make_train_loader
from switch_dit_jax.models import build_model
from switch_dit_jax.train import loop
from switch_dit_jax.train.checkpoint import Checkpointer
from switch_dit_jax.train.state import make_optimizer, state_shardings
from switch_dit_jax.train.step import make_diffusion, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART_ADM = os.path.join(ROOT, "configs", "quickstart_adm.py")
# The smallest UNet: one resolution (no resampling), one ResBlock, attention only in the middle.
TINY = {"model.in_channels": 3, "model.num_classes": 2, "model.unet.channel_mult": (1,),
        "model.unet.attention_resolutions": (),
        "data.name": "pixels", "data.hflip": True,
        "train.global_batch_size": 8, "train.num_steps": 4, "train.log_every": 1,
        "train.checkpoint_every": 2, "train.sample_every": 4, "train.warmup_steps": 0,
        "sample.num_samples": 4, "sample.batch_size": 8, "sample.num_steps": 3}


def block_image(rng, height, width):
    """An RGB image made of 2x2 constant blocks, and the image of those blocks' values."""
    small = rng.integers(0, 256, (height // 2, width // 2, 3), dtype=np.uint8)
    return small.repeat(2, 0).repeat(2, 1), small


def test_pixel_records_hold_adms_centre_crop(tmp_path):
    """A 32x16 image for size 8: one BOX halving (16x8, each 2x2 block becomes its value), no
    resize (the short side is 8), then the centre 8 of the 16 rows (rows 4..11)."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
    smalls = []
    for i in range(3):
        image, small = block_image(rng, 32, 16)
        smalls.append((small[4:12], int(i == 2)))
        Image.fromarray(image).save(tmp_path / "images" / ("a" if i < 2 else "b") / f"{i}.png")
    paths = pixels.write_from_source(out_dir=str(tmp_path / "shards"),
                                     image_dir=str(tmp_path / "images"), image_size=8,
                                     shard_size=2)
    assert [os.path.basename(p) for p in paths] == ["pixels-00000-of-00002.array_record",
                                                    "pixels-00001-of-00002.array_record"]
    source = pixels.PixelSource(str(tmp_path / "shards"))
    assert len(source) == 3 and source.image_shape == (8, 8, 3) and source.num_classes == 2
    for i, (want, label) in enumerate(smalls):
        rec = source[i]
        np.testing.assert_array_equal(np.rint((rec["image"] + 1) * 127.5), want)
        assert rec["label"] == label


def write_tiny_pixels(directory, n=16, size=8):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    pixels.write_pixel_shards(str(directory), zip(images, np.arange(n) % 2), n, num_classes=2,
                              num_shards=2)


def tiny_config(data_dir, cache_dir, **overrides):
    return load_config(QUICKSTART_ADM, dict(TINY, **{"data.dir": str(data_dir),
                                                     "train.compilation_cache": str(cache_dir)},
                                            **overrides))


def test_flips_come_from_the_loader(tmp_path):
    write_tiny_pixels(tmp_path / "px", n=8)
    config = tiny_config(tmp_path / "px", tmp_path / "cache")
    source = pixels.PixelSource(str(tmp_path / "px"))
    stored = {tuple(np.asarray(source[i]["image"]).ravel()[:12]) for i in range(8)}
    batch = next(iter(make_train_loader(config.data, 8)))
    flipped = 0
    for image in batch["image"]:
        if tuple(image.ravel()[:12]) not in stored:
            assert tuple(image[:, ::-1].ravel()[:12]) in stored
            flipped += 1
    assert 0 < flipped < 8  # seed 0 flips some of the 8, not all


def test_sharded_adm_step_on_8_devices_matches_1_device(tmp_path):
    # 64 channels: with 32, GroupNorm(32) normalises each channel alone, so the bias of the
    # conv before it has an analytically zero gradient whose round-off Adam would amplify.
    config = tiny_config(tmp_path, tmp_path / "cache", **{"model.routing.kind": "dtr",
                                                          "model.unet.model_channels": 64})
    model = build_model(config.model)
    tx = make_optimizer(config.train)
    step_fn = make_train_step(model, make_diffusion(config), tx, config)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32),
             "label": (np.arange(8) % 2).astype(np.int32)}
    split = []

    def check_state(state, sizes):
        if sizes["fsdp"] > 1:  # a conv kernel really is split over its output channels
            kernel = state.params["input_blocks_1_0"]["in_conv"]["kernel"]
            assert kernel.sharding.shard_shape(kernel.shape) == (3, 3, 64, 16)
            split.append(sizes["fsdp"])

    results = test_train.steps_on_1_and_8_devices(
        model, tx, step_fn, batch, 2, check_state=check_state,
        keep=lambda s, m: (s.params, s.ema_params, m))
    assert split == [4]
    assert np.isfinite(results[0][2]["loss"])
    # Same math, another reduction order: float32 round-off, which Adam's division by √v
    # turns into up to ~2 % of one 1e-3 update where a gradient is near zero (the worst is an
    # out_conv kernel entry whose gradient, ~6e-10, is 3e4 times below its kernel's median:
    # jax 0.10.2 gives 3.2e-6, jax 0.12 1.6e-5). A sharding bug is a whole update or more.
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=3e-5)


def restore_params(workdir, config):
    model = build_model(config.model)
    mesh = parallel.make_mesh(config.mesh)
    abstract, shardings = state_shardings(model, make_optimizer(config.train), mesh)
    with Checkpointer(workdir, config, max_to_keep=5, async_save=False) as ckpt:
        return jax.device_get(ckpt.restore(abstract, shardings, None)).params


def test_adm_trains_resumes_exactly_and_samples_npz(tmp_path):
    write_tiny_pixels(tmp_path / "px")
    cache = tmp_path / "cache"  # one compilation cache: the three runs compile once
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    loop.train_and_evaluate(tiny_config(tmp_path / "px", cache), straight)
    no_samples = {"train.sample_every": 0}
    loop.train_and_evaluate(tiny_config(tmp_path / "px", cache, **{"train.num_steps": 2},
                                        **no_samples), resumed)
    loop.train_and_evaluate(tiny_config(tmp_path / "px", cache, **no_samples), resumed)
    config = tiny_config(tmp_path / "px", cache)
    for a, b in zip(jax.tree.leaves(restore_params(straight, config)),
                    jax.tree.leaves(restore_params(resumed, config)), strict=True):
        np.testing.assert_array_equal(a, b)
    rows = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and np.isfinite(losses).all()
    with np.load(os.path.join(straight, "samples", "samples_00000004.npz")) as f:
        assert f["arr_0"].shape == (4, 8, 8, 3) and f["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(f["arr_1"], [0, 1, 0, 1])


def test_paper_configs_follow_appendix_c():
    for name, classes, steps, cfg_scale in (("adm_imagenet64", 1000, 400_000, 1.5),
                                            ("adm_ffhq64", 1, 100_000, 1.0)):
        for variant, kind in (("", "none"), (":dtr", "dtr"), (":random", "random")):
            c = load_config(os.path.join(ROOT, "configs", f"{name}.py{variant}"))
            assert (c.model.backbone, c.model.routing.kind, c.model.num_classes) == \
                ("adm", kind, classes)
            assert (c.train.learning_rate, c.train.weight_decay, c.train.global_batch_size,
                    c.train.num_steps, c.train.ema_decay) == (1e-4, 0.0, 256, steps, 0.9999)
            assert (c.diffusion.schedule, c.diffusion.num_timesteps, c.sample.sampler,
                    c.sample.num_steps, c.sample.cfg_scale) == ("cosine", 1000, "ddpm", 250,
                                                                cfg_scale)
            assert (c.model.routing.alpha, c.model.routing.beta) == (4.0, 0.8)
    # The released 64x64 model's architecture: guided-diffusion's keys, shapes and count.
    openai = load_config(os.path.join(ROOT, "configs", "adm_imagenet64.py:openai"))
    model = build_model(openai.model)
    shapes = ref.state_dict_shapes(dict(
        image_size=64, in_channels=3, model_channels=192, out_channels=6, num_res_blocks=3,
        attention_resolutions=(32, 16, 8), channel_mult=(1, 2, 3, 4), num_heads=4,
        num_head_channels=64, resblock_updown=True, use_scale_shift_norm=True,
        use_new_attention_order=True, num_classes=1000))
    s = model.input_size
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, s, s, 3)),
                                                 np.zeros((1,)), np.zeros((1,), np.int32)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
    assert n == sum(int(np.prod(v)) for v in shapes.values()) == 295_904_454


@pytest.mark.parametrize("overrides,message", [
    ({"model.unet.channel_mult": (1, 1.5)}, "not a multiple of the 32 GroupNorm groups"),
    ({"model.class_dropout_prob": 0.0}, "sample.cfg_scale=2.0 needs the null class"),
    ({"model.unet.num_head_channels": 0}, "config.model.unet.num_head_channels=0 must be"),
    ({"model.unet.attention_resolutions": (8, 5)}, "attention_resolutions has 5"),
])
def test_bad_adm_configs_name_the_field(tmp_path, overrides, message):
    from switch_dit_jax.validation import ConfigError, validate_config
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        validate_config(tiny_config(tmp_path, tmp_path / "cache", **overrides), num_devices=8)
