"""Captioned training data: the record's caption block, caption draws in the loader (seeded,
complete, resumable), the empty caption, and the digits_text source."""
import struct

import numpy as np
import pytest
from ml_collections import ConfigDict

from fake_text import FakeEncoder
from switch_dit_jax import config_fields
from switch_dit_jax.config_base import get_base_config
from switch_dit_jax.data import captions as captions_lib
from switch_dit_jax.data.pipeline import make_train_loader
from switch_dit_jax.data.sources import (DigitsSource, LatentShardWriter, LatentSource,
                                         decode_latent_record, encode_latent_record,
                                         make_source)
from switch_dit_jax.errors import BadFileError

K, L, D, N = 3, 4, 5, 12


def cfg(**kw):
    return ConfigDict(dict(dict(name="latents", dir="", hflip=False, latent_scale=0.5, seed=3,
                                num_workers=0), **kw))


def take(it, n):
    return [next(it) for _ in range(n)]


def test_caption_block_round_trip_and_old_records_unchanged():
    rng = np.random.default_rng(0)
    mean, std = rng.normal(size=(2, 2, 4)), rng.random((2, 2, 4))
    caps = rng.normal(size=(K, L, D)).astype(np.float16)
    mask = rng.random((K, L)) < 0.5
    plain = encode_latent_record(mean, std, 3, 7)
    # The SDL1 layout written out by hand: header, float32 mean, float32 std, nothing more.
    assert plain == (struct.pack("<4s5i", b"SDL1", 2, 2, 4, 3, 7)
                     + mean.astype("<f4").tobytes() + std.astype("<f4").tobytes())
    assert set(decode_latent_record(plain)) == {"mean", "std", "label", "num_classes"}
    rich = encode_latent_record(mean, std, 3, 7, caps, mask)
    assert rich[:len(plain)] == plain
    assert rich[len(plain):] == (struct.pack("<4s3i", b"TXT1", K, L, D)
                                 + caps.astype("<f2").tobytes() + mask.astype(np.uint8).tobytes())
    rec = decode_latent_record(rich)
    np.testing.assert_array_equal(rec["captions"], caps)
    np.testing.assert_array_equal(rec["caption_mask"], mask)
    np.testing.assert_array_equal(rec["mean"], mean.astype(np.float32))
    with pytest.raises(ValueError, match="caption block.*damaged"):
        decode_latent_record(rich[:-1])
    with pytest.raises(ValueError, match="TXT1"):
        decode_latent_record(plain + b"junk" * 8)


def write_shards(out_dir, captioned=True, n=N, k=K):
    """Record r: mean r, std 0 (so its image is r * scale); caption j of r filled with 10r+j."""
    with LatentShardWriter(str(out_dir), 0, 1, num_classes=0) as w:
        for r in range(n):
            mean = np.full((2, 2, 1), r, np.float32)
            std = np.full((2, 2, 1), 0.25 if not captioned else 0.0, np.float32)
            if captioned:
                caps = (10 * r + np.arange(k, dtype=np.float32))[:, None, None] * np.ones((L, D))
                mask = np.arange(L)[None, :] <= np.arange(k)[:, None]  # caption j: j+1 tokens
                w.write(mean, std, 0, caps, mask)
            else:
                w.write(mean, std, 0)


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    out = tmp_path_factory.mktemp("captioned")
    write_shards(out)
    return out


def test_loader_draws_each_records_captions_deterministically(coco_like):
    source = LatentSource(str(coco_like))
    assert source.text_shape == (K, L, D) and source.num_classes is None
    batches = take(iter(make_train_loader(cfg(dir=str(coco_like)), 6, source=source)), 40)
    assert set(batches[0]) == {"image", "text", "text_mask"}
    b = batches[0]
    assert b["text"].dtype == np.float32 and b["text"].shape == (6, L, D)
    assert b["text_mask"].dtype == bool and b["text_mask"].shape == (6, L)
    seen = set()
    for b in batches:
        records = b["image"][:, 0, 0, 0] / 0.5
        for r, text, mask in zip(records, b["text"], b["text_mask"]):
            code = text[0, 0]
            assert np.all(text == code)
            rec, j = divmod(int(code), 10)
            assert rec == r and 0 <= j < K  # the caption belongs to the image's record
            np.testing.assert_array_equal(mask, np.arange(L) <= j)
            seen.add((rec, j))
    assert seen == {(r, j) for r in range(N) for j in range(K)}  # 240 draws cover all 36
    again = take(iter(make_train_loader(cfg(dir=str(coco_like)), 6, source=source)), 40)
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["text"], b["text"])
    other = take(iter(make_train_loader(cfg(dir=str(coco_like), seed=4), 6, source=source)), 40)
    assert any(not np.array_equal(a["text"], b["text"]) for a, b in zip(batches, other))


def test_caption_draw_resumes_exactly_and_leaves_the_noise_alone(coco_like, tmp_path):
    source = LatentSource(str(coco_like))
    it = iter(make_train_loader(cfg(dir=str(coco_like), hflip=True), 4, source=source))
    take(it, 3)
    state = it.get_state()
    after = take(it, 4)
    it2 = iter(make_train_loader(cfg(dir=str(coco_like), hflip=True), 4, source=source))
    it2.set_state(state)
    for a, b in zip(after, take(it2, 4)):
        for key in ("image", "text", "text_mask"):
            np.testing.assert_array_equal(a[key], b[key])
    # The same latents without captions: identical posterior noise and flips.
    plain = tmp_path / "plain"
    write_shards(plain, captioned=False)
    write_shards(tmp_path / "noisy", captioned=True)
    noisy = LatentSource(str(tmp_path / "noisy"))
    noisy._record = _with_std(noisy._record)
    c = cfg(hflip=True)
    x = take(iter(make_train_loader(c, 4, source=LatentSource(str(plain)))), 5)
    y = take(iter(make_train_loader(c, 4, source=noisy)), 5)
    for a, b in zip(x, y):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert "label" in a and "label" not in b


def _with_std(read):
    def record(index):
        rec = read(index)
        rec["std"] = np.full_like(rec["std"], 0.25)  # as the captionless shards store
        return rec
    return record


def test_mixed_shards_are_refused(tmp_path):
    write_shards(tmp_path / "d", captioned=True)
    with LatentShardWriter(str(tmp_path / "d"), 0, 1, prefix="zz", num_classes=0) as w:
        w.write(np.zeros((2, 2, 1)), np.zeros((2, 2, 1)), 0)
    source = LatentSource(str(tmp_path / "d"))
    with pytest.raises(BadFileError, match=r"captions of shape None.*\(3, 4, 5\)"):
        source[N]


def test_empty_caption_of_latents_and_digits_text(tmp_path):
    enc = FakeEncoder()
    path = captions_lib.write_empty_caption(str(tmp_path), enc)
    text, mask = captions_lib.load_empty_caption(cfg(dir=str(tmp_path)))
    want_text, want_mask = enc.encode([""])
    np.testing.assert_array_equal(text, want_text[0])
    np.testing.assert_array_equal(mask, [True, True] + [False] * 6)  # <bos> <eos>
    assert text.dtype == np.float32 and mask.dtype == bool and path.endswith(
        "empty_caption.npz")
    text2, _ = captions_lib.load_empty_caption(cfg(name="digits_text"), encoder=enc)
    np.testing.assert_array_equal(text2, text)
    with pytest.raises(FileNotFoundError, match="no empty_caption.npz.*--source=coco"):
        captions_lib.load_empty_caption(cfg(dir=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="data.name='digits' has no captions"):
        captions_lib.load_empty_caption(cfg(name="digits"))
    full = get_base_config()
    full.data.name = "digits_text"
    with pytest.raises(ValueError, match="config.text.encoder_dir is empty.*text.tiny --out"):
        captions_lib.load_empty_caption(full)


def test_digits_text_batches_carry_one_caption_of_the_images_class():
    enc = FakeEncoder(width=4, max_length=8)
    source = captions_lib.DigitsTextSource(encoder=enc)
    assert repr(source) == "DigitsTextSource(templates=5, text_shape=(8, 4))"
    digits = DigitsSource()
    index = {digits[i]["image"].tobytes(): int(digits[i]["label"]) for i in range(len(digits))}
    names = "zero one two three four five six seven eight nine".split()
    seen = set()
    it = iter(make_train_loader(cfg(name="digits_text", seed=0), 32, source=source))
    for batch in take(it, 12):
        assert set(batch) == {"image", "text", "text_mask"}
        for image, text, mask in zip(batch["image"], batch["text"], batch["text_mask"]):
            label = index[image.tobytes()]
            options = [f"a handwritten {names[label]}", f"the digit {label}",
                       f"a handwritten digit {names[label]}", f"the number {label}",
                       f"a picture of the number {names[label]}"]
            want, want_mask = enc.encode(options)
            hits = [j for j in range(5) if np.array_equal(text, want[j])]
            assert len(hits) == 1 and np.array_equal(mask, want_mask[hits[0]])
            seen.add((label, hits[0]))
    assert len(seen) == 50  # 384 draws reach every template of every class


def test_digits_text_needs_an_encoder_dir(tmp_path):
    with pytest.raises(ValueError, match="config.text.encoder_dir is empty.*switch_dit_jax"
                                         r"\.text\.tiny --out=DIR"):
        make_source(cfg(name="digits_text"))
    with pytest.raises(FileNotFoundError, match="nowhere' is not a directory.*text.tiny"):
        make_source(cfg(name="digits_text"), text_encoder_dir=str(tmp_path / "nowhere"))


def test_template_words_and_config_fields():
    words = {w for t in captions_lib.DIGIT_TEMPLATES
             for w in t.format(name="", digit="").split()}
    words |= {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    words |= {str(d) for d in range(10)}
    assert words == set(captions_lib.DIGIT_TEXT_WORDS)
    c = get_base_config()
    c.data.name = "digits_text"
    c.text.encoder_dir = "/somewhere/tiny_clip"
    config_fields.check_fields(c)
    c.data.name = "digits_txt"
    with pytest.raises(ValueError, match="digits_text"):
        config_fields.check_fields(c)


def test_validation_of_digits_text_configs():
    import os
    from switch_dit_jax import validation
    from switch_dit_jax.config_base import load_config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config(os.path.join(root, "configs", "quickstart.py"),
                    {"data.name": "digits_text", "model.num_classes": 1000,
                     "model.conditioning": "text", "train.sample_every": 0})
    with pytest.raises(ValueError, match="config.text.encoder_dir is empty but "
                                         "data.name='digits_text'.*--config.text.encoder_dir"):
        validation.validate_config(c, 1)
    c.text.encoder_dir = "/somewhere/tiny_clip"
    validation.validate_config(c, 1)  # a text model's class table size is not the digits'
    c.data.name = "digits"
    c.model.conditioning = "class"
    with pytest.raises(ValueError, match="the digits have 10 classes"):
        validation.validate_config(c, 1)


def test_digits_text_with_the_tiny_clip_has_no_unknown_word_and_distinct_captions(tmp_path):
    from switch_dit_jax.text import DIGIT_WORDS, load_text_encoder, write_tiny_clip

    assert set(captions_lib.DIGIT_TEXT_WORDS) <= set(DIGIT_WORDS)
    encoder = load_text_encoder(write_tiny_clip(str(tmp_path / "clip"), DIGIT_WORDS, seed=1))
    texts = [c for label in range(10) for c in captions_lib.digit_captions(label)]
    ids, mask = encoder.tokenize(texts)
    for text, row, m in zip(texts, ids, mask):
        # BOS, one id per word, EOS: the unknown token is EOS, so a missing word would show as
        # an EOS before the last real position.
        words = text.split()
        assert m.sum() == len(words) + 2, text
        assert row[int(m.sum()) - 1] not in row[1:int(m.sum()) - 1], text
    hidden, _ = encoder.encode(texts)
    flat = np.asarray(hidden).reshape(len(texts), -1)
    distances = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
    assert (distances + np.eye(len(texts)) > 1e-3).all()  # 50 different conditions
