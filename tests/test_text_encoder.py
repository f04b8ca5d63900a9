"""The Flax CLIP text encoder against a NumPy forward of the Hugging Face layout; causal
masking; tokenisation; refusals of bad directories by name."""
import json
import os

import numpy as np
import pytest

from reference_clip import read_dir, rewrite, text_hidden
from switch_dit_jax.errors import BadFileError, UserError
from switch_dit_jax.text import DIGIT_WORDS, load_text_encoder, write_tiny_clip

WORDS = ("a", "handwritten", "digit", "seven", "the", "number", "7", ",", ".")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(str(tmp_path_factory.mktemp("clip")), WORDS, seed=1)


def _edit_config(model_dir, change):
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    change(config)
    with open(path, "w") as f:
        json.dump(config, f)


def _random_ids(encoder, batch, rng):
    return rng.integers(0, encoder.config.vocab_size, (batch, encoder.max_length))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_encode_ids_matches_numpy_forward(tmp_path, act):
    model_dir = write_tiny_clip(str(tmp_path), WORDS, seed=2, width=48, heads=3, layers=2)
    _edit_config(model_dir, lambda c: c["text_config"].update(hidden_act=act))
    encoder = load_text_encoder(model_dir)
    ids = _random_ids(encoder, 3, np.random.default_rng(0))
    sd, config = read_dir(model_dir)
    want = text_hidden(sd, config, ids)
    got = np.asarray(encoder.encode_ids(ids))
    assert got.shape == (3, 16, 48) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # a shorter sequence uses the first rows of the position table, as HF does
    np.testing.assert_allclose(np.asarray(encoder.encode_ids(ids[:, :5])), text_hidden(
        sd, config, ids[:, :5]), atol=1e-5, rtol=0)


def test_later_tokens_never_change_earlier_outputs(clip_dir):
    encoder = load_text_encoder(clip_dir)
    rng = np.random.default_rng(3)
    ids = _random_ids(encoder, 1, rng)
    base = np.asarray(encoder.encode_ids(ids))[0]
    for j in (1, 7, encoder.max_length - 1):
        changed = ids.copy()
        changed[0, j] = (ids[0, j] + 1) % encoder.config.vocab_size
        out = np.asarray(encoder.encode_ids(changed))[0]
        np.testing.assert_array_equal(out[:j], base[:j])
        assert np.abs(out[j:] - base[j:]).max(axis=-1).min() > 1e-4  # every later one moves


def _write_tokenizer(model_dir, vocab, pad=None):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    if pad is not None:
        with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": {"content": "</s>"}, "pad_token": pad}, f)


def test_tokenisation_round_trip(clip_dir, tmp_path):
    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, "cat": 4, "dog": 5, "sat": 6, ".": 7}
    encoder = load_text_encoder(clip_dir)  # max_length 16
    for name in ("config.json", "model.safetensors"):
        os.link(os.path.join(clip_dir, name), tmp_path / name)

    _write_tokenizer(tmp_path, vocab, pad="<pad>")
    ids, mask = load_text_encoder(str(tmp_path)).tokenize(["Cat sat.", "", "dog " * 20, "owl"])
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (4, 16)
    np.testing.assert_array_equal(ids[0], [2, 4, 6, 7, 3] + [1] * 11)
    np.testing.assert_array_equal(ids[1], [2, 3] + [1] * 14)
    np.testing.assert_array_equal(ids[2], [2] + [5] * 14 + [3])  # cut, EOS kept last
    np.testing.assert_array_equal(ids[3], [2, 0, 3] + [1] * 13)
    np.testing.assert_array_equal(mask.sum(1), [5, 2, 16, 3])
    np.testing.assert_array_equal(mask, np.arange(16) < mask.sum(1, keepdims=True))

    _write_tokenizer(tmp_path, vocab)  # no tokenizer_config.json: pad with <|endoftext|>
    os.remove(tmp_path / "tokenizer_config.json")
    with pytest.raises(BadFileError, match=r"no token '<\|endoftext\|>'"):
        load_text_encoder(str(tmp_path))
    vocab["<|endoftext|>"] = 8
    _write_tokenizer(tmp_path, vocab)
    ids, _ = load_text_encoder(str(tmp_path)).tokenize(["dog"])
    np.testing.assert_array_equal(ids[0], [2, 5, 3] + [8] * 13)


def test_encode_is_tokenise_then_encode_ids_in_any_batching(clip_dir):
    encoder = load_text_encoder(clip_dir)
    texts = ["a handwritten digit seven", "the number 7", "", "a 7, a seven.", "digit"]
    ids, mask = encoder.tokenize(texts)
    hidden, mask2 = encoder.encode(texts, batch_size=2)
    np.testing.assert_array_equal(mask, mask2)
    sd, config = read_dir(clip_dir)
    np.testing.assert_allclose(hidden, text_hidden(sd, config, ids), atol=1e-5, rtol=0)
    # other batch sizes block the float32 matmuls differently: round-off only (a batching bug
    # would mix captions, an O(1) difference)
    np.testing.assert_allclose(encoder.encode(texts)[0], hidden, atol=1e-5, rtol=0)
    assert encoder.width == 32 and encoder.max_length == 16
    with pytest.raises(UserError, match="list of strings"):
        encoder.encode("a seven")
    with pytest.raises(UserError, match="outside this CLIP's vocabulary"):
        encoder.encode_ids(np.full((1, 4), encoder.config.vocab_size))
    with pytest.raises(UserError, match="length at most 16"):
        encoder.encode_ids(np.zeros((1, 17), np.int32))


def test_full_clip_and_text_model_directories_both_load(tmp_path):
    full = write_tiny_clip(str(tmp_path / "full"), DIGIT_WORDS, seed=4)
    text = write_tiny_clip(str(tmp_path / "text"), DIGIT_WORDS, seed=4, vision=False)
    with open(os.path.join(text, "config.json")) as f:
        assert "text_config" not in json.load(f)
    sd_full, _ = read_dir(full)
    sd_text, config = read_dir(text)
    assert set(sd_text) == {k for k in sd_full if k.startswith("text_model.")}
    # the text-only file gets the full file's text weights: both must then encode alike
    rewrite(text, lambda sd: sd.update({k: v.astype(np.float32) for k, v in sd_full.items()
                                        if k in sd}))
    a, b = load_text_encoder(full), load_text_encoder(text)
    ids = _random_ids(a, 2, np.random.default_rng(5))
    np.testing.assert_allclose(np.asarray(a.encode_ids(ids)), np.asarray(b.encode_ids(ids)),
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(b.encode_ids(ids)),
                               text_hidden(read_dir(text)[0], config, ids), atol=1e-5, rtol=0)
    # older exports carry position_ids and text_config_dict (which wins over text_config)
    rewrite(text, lambda sd: sd.update({"text_model.embeddings.position_ids":
                                        np.arange(16, dtype=np.int64)[None]}))
    assert load_text_encoder(text).max_length == 16
    _edit_config(full, lambda c: c.update(text_config_dict={"num_hidden_layers": 3}))
    with pytest.raises(BadFileError, match="no tensor 'text_model.encoder.layers.2"):
        load_text_encoder(full)


def _refused(model_dir, match):
    with pytest.raises((UserError, FileNotFoundError), match=match):
        load_text_encoder(model_dir)


def test_bad_directories_are_refused_by_name(tmp_path):
    d = write_tiny_clip(str(tmp_path / "c"), WORDS, vision=False)
    weights = os.path.join(d, "model.safetensors")
    key = "text_model.encoder.layers.1.mlp.fc1.bias"
    rewrite(d, lambda sd: sd.update({"text_model.encoder.layers.1.mlp.fc3.bias": sd[key]}))
    _refused(d, rf"{weights}'? has tensor 'text_model.encoder.layers.1.mlp.fc3.bias'")
    rewrite(d, lambda sd: sd.pop("text_model.encoder.layers.1.mlp.fc3.bias"))
    rewrite(d, lambda sd: sd.update({"bogus": sd[key]}))
    _refused(d, "has tensor 'bogus'")
    rewrite(d, lambda sd: sd.pop("bogus"))
    rewrite(d, lambda sd: sd.pop(key))
    _refused(d, f"{weights}'? has no tensor '{key}'")
    rewrite(d, lambda sd: sd.update({key: np.zeros(7, np.float32)}))
    _refused(d, rf"tensor '{key}' in '{weights}' has shape \(7,\) but .* needs \(128,\)")
    rewrite(d, lambda sd: sd.update({key: np.zeros(128, np.float32),
                                     "text_model.embeddings.position_ids":
                                         np.arange(1, 17, dtype=np.int64)[None]}))
    _refused(d, f"'text_model.embeddings.position_ids' differs .*; '{weights}' is not")
    rewrite(d, lambda sd: sd.pop("text_model.embeddings.position_ids"))
    assert load_text_encoder(d).width == 32

    _edit_config(d, lambda c: c.update(hidden_act="relu"))
    _refused(d, "hidden_act='relu'; this CLIP supports quick_gelu and gelu only")
    _edit_config(d, lambda c: c.update(hidden_act="gelu"))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        os.remove(os.path.join(d, name))
        _refused(d, f"CLIP file '{os.path.join(d, name)}' does not exist; .*huggingface-cli "
                    "download openai/clip-vit-large-patch14")


def test_tiny_cli_covers_the_digit_captions(tmp_path):
    from switch_dit_jax.text.tiny import main
    main([f"--out={tmp_path}"])
    encoder = load_text_encoder(str(tmp_path))
    captions = ([f"a handwritten digit {w}" for w in ("zero", "one", "five", "nine")]
                + [f"the number {d}" for d in range(10)] + ["An image of a 7.", "a picture, 3"])
    ids, mask = encoder.tokenize(captions)
    eos = encoder.config.eos_token_id
    assert encoder.config.vocab_size == len(DIGIT_WORDS) + 2
    for row, real in zip(ids, mask):
        body = row[real][1:-1]  # an unknown word would be the unk token, OpenAI's EOS
        assert row[real][0] == eos - 1 and row[real][-1] == eos and eos not in body
    hidden, _ = encoder.encode(captions[4:6])
    assert np.abs(hidden[0, 3] - hidden[1, 3]).max() > 0.1  # "0" and "1" encode apart


def test_config_reads_hugging_face_names_and_defaults_to_vit_l14(tmp_path):
    from switch_dit_jax.text.config import read_config
    path = tmp_path / "config.json"
    # what config.json omits is OpenAI's clip-vit-large-patch14 (its published config.json)
    path.write_text(json.dumps({"text_config": {}, "vision_config": {}}))
    c = read_config(str(tmp_path))
    assert (c.text.tower.width, c.text.tower.layers, c.text.tower.heads,
            c.text.tower.mlp_width) == (768, 12, 12, 3072)
    assert (c.text.vocab_size, c.text.max_length, c.text.eos_token_id) == (49408, 77, 49407)
    assert (c.vision.tower.width, c.vision.tower.layers, c.vision.tower.heads,
            c.vision.tower.mlp_width) == (1024, 24, 16, 4096)
    assert (c.vision.image_size, c.vision.patch_size, c.vision.channels) == (224, 14, 3)
    assert c.projection_dim == 768
    path.write_text(json.dumps({
        "text_config": {"max_position_embeddings": 33, "vocab_size": 50, "eos_token_id": 2},
        "vision_config": {"num_channels": 1, "image_size": 28, "patch_size": 7}}))
    c = read_config(str(tmp_path))
    assert (c.text.vocab_size, c.text.max_length, c.text.eos_token_id) == (50, 33, 2)
    assert (c.vision.image_size, c.vision.patch_size, c.vision.channels) == (28, 7, 1)
    path.write_text(json.dumps({"text_config": {}, "vision_config": {"num_channels": 0}}))
    with pytest.raises(BadFileError, match="num_channels=0, which must be a positive integer"):
        read_config(str(tmp_path))
    path.write_text(json.dumps({"max_position_embeddings": True}))  # a CLIPTextModel config
    with pytest.raises(BadFileError, match="max_position_embeddings=True"):
        read_config(str(tmp_path))
