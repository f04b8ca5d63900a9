"""The CLIP vision tower, the pooled text embedding and the CLIP score against NumPy."""
import json
import os

import numpy as np
import pytest

from reference_clip import image_embeds, read_dir, rewrite, text_embeds
from switch_dit_jax.errors import UserError
from switch_dit_jax.text import DIGIT_WORDS, clip_score, clip_scores, load_clip, write_tiny_clip
from switch_dit_jax.text.clip import ClipModel
from switch_dit_jax.text.clip_score import MEAN, STD, preprocess

CAPTIONS = ["a handwritten digit seven", "the number 7", "", "an image of a 3, on white."]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(str(tmp_path_factory.mktemp("clip")), DIGIT_WORDS, seed=3,
                           width=32, heads=4, image_size=32, patch_size=8)


def _images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_vision_tower_matches_numpy_forward(clip_dir):
    clip = load_clip(clip_dir)
    images = _images(3, 32, 32)  # already the model's size: preprocessing only normalises
    sd, config = read_dir(clip_dir)
    pixels = (images / 255.0 - MEAN.astype(np.float64)) / STD.astype(np.float64)
    want = image_embeds(sd, config, pixels)
    got = clip.image_embeds(images, batch_size=2)
    assert got.shape == (3, 32) and np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_preprocessing_crops_the_centre_and_normalises():
    wide = _images(1, 32, 64, seed=1)  # short side already 32: a pure centre crop
    np.testing.assert_allclose(preprocess(wide, 32)[0], (wide[0, :, 16:48] / 255.0 - MEAN) / STD,
                               atol=1e-6)
    flat = np.full((2, 70, 50, 3), 200, np.uint8)  # bicubic keeps a constant image constant
    out = preprocess(flat, 32)
    assert out.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(out, np.broadcast_to((200 / 255.0 - MEAN) / STD, out.shape),
                               atol=1e-6)


@pytest.mark.parametrize("eos", ["first", "legacy"])
def test_text_embeds_pool_at_the_eos_as_hugging_face(clip_dir, tmp_path, eos):
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        os.link(os.path.join(clip_dir, name), tmp_path / name)
    with open(os.path.join(clip_dir, "config.json")) as f:
        config = json.load(f)
    config["text_config"]["eos_token_id"] = 5 if eos == "first" else 2  # 2: argmax of the ids
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    clip = load_clip(str(tmp_path))
    ids = np.array([[9, 1, 5, 30, 5, 7, 3, 2, 0, 0, 0, 0, 0, 0, 0, 0],
                    [5, 40, 12, 1, 1, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]], np.int32)
    got = np.asarray(ClipModel(clip.config).apply({"params": clip.params}, ids,
                                                  method="text_embeds"))
    sd, _ = read_dir(clip_dir)
    want = text_embeds(sd, config, ids)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    other = text_embeds(sd, {"text_config": {**config["text_config"],
                                             "eos_token_id": 5 if eos == "legacy" else 2}}, ids)
    assert np.abs(other - want).max() > 1e-3  # the two rules pool different tokens here


def test_clip_score_is_the_clamped_cosine_in_percent(clip_dir):
    clip = load_clip(clip_dir)
    images = _images(len(CAPTIONS), 40, 48, seed=2)
    sd, config = read_dir(clip_dir)
    ids, _ = clip.tokenizer.tokenize(CAPTIONS)
    a = clip.image_embeds(images).astype(np.float64)
    b = text_embeds(sd, config, ids)
    cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    scores = clip_scores(images, CAPTIONS, clip, batch_size=3)
    np.testing.assert_allclose(scores, 100 * np.maximum(cos, 0), atol=1e-3)
    assert np.all((scores >= 0) & (scores <= 100))
    assert clip_score(images, CAPTIONS, clip_dir) == pytest.approx(scores.mean(), abs=1e-3)


@pytest.mark.parametrize("angle, want", [(0.0, 100.0), (60.0, 50.0), (180.0, 0.0)])
def test_clip_score_of_known_directions(tmp_path, angle, want):
    d = write_tiny_clip(str(tmp_path), DIGIT_WORDS, seed=5)
    u = np.zeros(32, np.float32)
    u[0] = 1.0
    v = np.zeros(32, np.float32)
    v[0], v[1] = np.cos(np.radians(angle)), np.sin(np.radians(angle))

    def fix(sd):  # zero LayerNorm scales: the pooled states are the biases u and 3v
        sd["text_model.final_layer_norm.weight"][:] = 0
        sd["text_model.final_layer_norm.bias"][:] = u
        sd["vision_model.post_layernorm.weight"][:] = 0
        sd["vision_model.post_layernorm.bias"][:] = 3 * v
        sd["text_projection.weight"][:] = np.eye(32)
        sd["visual_projection.weight"][:] = np.eye(32)
    rewrite(d, fix)
    assert clip_score(_images(2, 32, 32), ["a 7", "the digit nine"], d) == pytest.approx(
        want, abs=1e-3)


def test_bad_inputs_are_refused(clip_dir, tmp_path):
    clip = load_clip(clip_dir)
    with pytest.raises(UserError, match="2 images but 1 texts"):
        clip_scores(_images(2, 32, 32), ["a 7"], clip)
    with pytest.raises(UserError, match=r"uint8 \[N, H, W, 3\]"):
        clip.image_embeds(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(UserError, match="positive integer"):
        clip.text_embeds(["a 7"], batch_size=0)
    text_only = write_tiny_clip(str(tmp_path / "text"), DIGIT_WORDS, vision=False)
    with pytest.raises(UserError, match="holds a CLIPTextModel, but the CLIP score needs"):
        clip_score(_images(1, 32, 32), ["a 7"], text_only)
    broken = write_tiny_clip(str(tmp_path / "full"), DIGIT_WORDS)
    rewrite(broken, lambda sd: sd.pop("vision_model.post_layernorm.bias"))
    with pytest.raises(UserError, match="no tensor 'vision_model.post_layernorm.bias'"):
        load_clip(broken)
