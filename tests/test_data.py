"""Data layer tests: sources, grain pipeline (sharding, flips, latent noise, checkpoints), errors."""
import os

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from switch_dit_jax.data import (
    DigitsSource, LatentShardWriter, LatentSource, TfdsSource, center_crop_arr, global_batch,
    make_source, make_train_loader, write_latent_shards)

SCALE = np.float32(0.18215)


def cfg(**kw):
    base = dict(name="digits", dir="", tfds_name="", split="train", image_size=8, hflip=False,
                latent_scale=0.18215, num_workers=0, seed=0)
    base.update(kw)
    return ml_collections.ConfigDict(base)


class IndexSource:
    """Record i is a constant image of value i: makes record identity visible in batches."""

    image_shape = (2, 2, 1)
    num_classes = 10

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((2, 2, 1), i, np.float32), "label": np.int32(i % 10)}

    def __repr__(self):
        return f"IndexSource({self.n})"


@pytest.fixture(scope="module")
def digits():
    return DigitsSource()


def take(it, k):
    return [next(it) for _ in range(k)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("image", "label"):
            np.testing.assert_array_equal(x[key], y[key])


def ids(batches):
    return np.concatenate([b["image"][:, 0, 0, 0] for b in batches]).astype(int)


# ------------------------------------------------------------------ digits / pipeline


def test_digits_source(digits):
    assert len(digits) == 1797 and digits.image_shape == (8, 8, 1) and digits.num_classes == 10
    images = np.stack([digits[i]["image"] for i in range(len(digits))])
    labels = np.array([digits[i]["label"] for i in range(len(digits))])
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert labels.dtype == np.int32 and set(labels.tolist()) == set(range(10))


def test_make_source_digits_and_loader_shapes(digits):
    assert isinstance(make_source(cfg(image_size=256)), DigitsSource)  # image_size is tfds-only
    loader = make_train_loader(cfg(), 32, source=digits)
    assert loader.source.image_shape == (8, 8, 1)
    b = next(iter(loader))
    assert b["image"].shape == (32, 8, 8, 1) and b["image"].dtype == np.float32
    assert b["label"].shape == (32,) and b["label"].dtype == np.int32
    assert b["image"].min() >= -1 and b["image"].max() <= 1


def test_determinism_and_seeds(digits):
    c = cfg(hflip=True)
    a = take(iter(make_train_loader(c, 16, source=digits)), 3)
    b = take(iter(make_train_loader(c, 16, source=digits)), 3)
    assert_batches_equal(a, b)
    d = take(iter(make_train_loader(c, 16, seed=1, source=digits)), 3)
    assert not np.array_equal(a[0]["label"], d[0]["label"])


def test_flips_are_exact_mirrors_and_about_half(digits):
    originals = {digits[i]["image"].tobytes() for i in range(len(digits))}
    plain = take(iter(make_train_loader(cfg(hflip=False), 64, num_epochs=1, source=digits)), 28)
    flipped = take(iter(make_train_loader(cfg(hflip=True), 64, num_epochs=1, source=digits)), 28)
    n_flipped = n = 0
    for p, f in zip(plain, flipped):
        np.testing.assert_array_equal(p["label"], f["label"])  # same shuffle, same records
        for x, y in zip(p["image"], f["image"]):
            assert x.tobytes() in originals  # hflip=False never alters a record
            if not np.array_equal(x, y):
                np.testing.assert_array_equal(y, x[:, ::-1])
                n_flipped += 1
            n += 1
    assert n == 28 * 64 and 0.4 < n_flipped / n < 0.6


def test_two_processes_disjoint_and_cover_epoch():
    src = IndexSource(100)
    seen = [ids(list(make_train_loader(cfg(), 10, p, 2, num_epochs=1, source=src)))
            for p in (0, 1)]
    assert all(len(s) == 50 and len(set(s)) == 50 for s in seen)
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(100))
    # An uneven dataset loses only the drop_remainder tail.
    src = IndexSource(103)
    seen = [set(ids(list(make_train_loader(cfg(), 10, p, 2, num_epochs=1, source=src))))
            for p in (0, 1)]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 100


def test_epochs_repeat_with_reshuffle():
    src = IndexSource(40)
    got = ids(take(iter(make_train_loader(cfg(), 8, source=src)), 10))
    first, second = got[:40], got[40:]
    assert sorted(first) == sorted(second) == list(range(40))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("k", [3, 4])  # 4 batches of 8 out of 40 crosses an epoch boundary
def test_checkpoint_resume_bitwise(digits, k):
    c = cfg(hflip=True)
    it = iter(make_train_loader(c, 8, source=digits if k == 3 else IndexSource(40)))
    take(it, k)
    state = it.get_state()
    assert isinstance(state, bytes)
    a = take(it, k)
    it2 = iter(make_train_loader(c, 8, source=digits if k == 3 else IndexSource(40)))
    it2.set_state(state)
    assert_batches_equal(a, take(it2, k))


def test_checkpoint_resume_with_workers(digits):
    c = cfg(hflip=True, num_workers=2)
    it = iter(make_train_loader(c, 16, source=digits))
    take(it, 2)
    state = it.get_state()
    a = take(it, 3)
    it2 = iter(make_train_loader(c, 16, source=digits))
    it2.set_state(state)
    assert_batches_equal(a, take(it2, 3))
    # grain refuses a checkpoint taken with another worker_count (batches would differ).
    with pytest.raises(ValueError, match="[Ww]orker count"):
        iter(make_train_loader(cfg(hflip=True), 16, source=digits)).set_state(state)


# ------------------------------------------------------------------ latents


def latent_data(n=37, std=0.0, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((n, 4, 4, 4)).astype(np.float32)
    means[:, 0, 0, 0] = np.arange(n)  # record id, also makes every record flip-asymmetric
    stds = np.full((n, 4, 4, 4), std, np.float32)
    labels = np.arange(n, dtype=np.int32)
    return means, stds, labels


def test_latent_roundtrip_and_source(tmp_path):
    means, stds, labels = latent_data(std=0.5)
    stds[3] = 0.25
    paths = write_latent_shards(str(tmp_path), means, stds, labels, num_shards=3, num_classes=40)
    assert [os.path.basename(p) for p in paths] == [
        f"latents-{i:05d}-of-00003.array_record" for i in range(3)]
    src = LatentSource(str(tmp_path))
    assert len(src) == 37 and src.image_shape == (4, 4, 4) and src.num_classes == 40
    for i in range(37):
        rec = src[i]
        assert rec["label"] == i and rec["label"].dtype == np.int32
        np.testing.assert_array_equal(rec["mean"], means[i])
        np.testing.assert_array_equal(rec["std"], stds[i])


def test_latent_pipeline_std_zero_is_exact(tmp_path):
    means, stds, labels = latent_data(std=0.0)
    write_latent_shards(str(tmp_path), means, stds, labels, num_shards=2)
    c = cfg(name="latents", dir=str(tmp_path), hflip=True)
    batches = take(iter(make_train_loader(c, 8)), 9)
    flips = 0
    for b in batches:
        assert b["image"].shape == (8, 4, 4, 4) and b["image"].dtype == np.float32
        for img, lab in zip(b["image"], b["label"]):
            expected = means[lab] * SCALE
            if np.array_equal(img, expected[:, ::-1]):
                flips += 1
            else:
                np.testing.assert_array_equal(img, expected)
    assert 0 < flips < 72


def test_latent_pipeline_noise(tmp_path):
    means, stds, labels = latent_data(std=0.5)
    write_latent_shards(str(tmp_path), means, stds, labels)
    c = cfg(name="latents", dir=str(tmp_path), hflip=False)
    epochs = take(iter(make_train_loader(c, 37)), 8)  # one batch == one epoch
    eps = np.concatenate([(b["image"] / SCALE - means[b["label"]]) / 0.5 for b in epochs])
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
    by_label = [dict(zip(b["label"].tolist(), b["image"])) for b in epochs[:2]]
    for lab in range(37):  # the same record gets fresh noise in every epoch
        assert not np.allclose(by_label[0][lab], by_label[1][lab])
    # ...and a resumed iterator reproduces that noise bitwise.
    it = iter(make_train_loader(c, 37))
    take(it, 2)
    state = it.get_state()
    it2 = iter(make_train_loader(c, 37))
    it2.set_state(state)
    assert_batches_equal(take(it, 2), take(it2, 2))


def test_unclosed_or_failed_writer_leaves_no_shard(tmp_path):
    means, stds, labels = latent_data(n=3)
    w = LatentShardWriter(str(tmp_path))
    w.write(means[0], stds[0], labels[0])  # never closed: simulates a crash
    with pytest.raises(RuntimeError):
        with LatentShardWriter(str(tmp_path), 0, 2) as w2:
            w2.write(means[1], stds[1], labels[1])
            raise RuntimeError("extraction failed")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".array_record")]
    with pytest.raises(FileNotFoundError, match="data.dir"):
        LatentSource(str(tmp_path))


# ------------------------------------------------------------------ errors


def test_clear_errors(tmp_path, digits):
    with pytest.raises(FileNotFoundError, match="data.dir="):
        make_source(cfg(name="latents", dir=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="data.dir=.*no \\*.array_record"):
        make_source(cfg(name="latents", dir=str(tmp_path)))
    with pytest.raises(ValueError, match="data.name='cifar'.*digits"):
        make_source(cfg(name="cifar"))
    with pytest.raises(ValueError, match="global_batch_size=10.*process_count=3"):
        make_train_loader(cfg(), 10, 0, 3, source=digits)
    with pytest.raises(ValueError, match="global_batch_size=2048"):
        make_train_loader(cfg(), 2048, source=digits)
    with pytest.raises(ValueError, match="data.seed=-1"):
        make_train_loader(cfg(seed=-1), 8, source=digits)
    with pytest.raises(ValueError, match="data.num_workers=-2"):
        make_train_loader(cfg(num_workers=-2), 8, source=digits)


# ------------------------------------------------------------------ global batch


def test_global_batch_one_and_eight_devices(digits):
    local = next(iter(make_train_loader(cfg(), 16, source=digits)))
    devices = np.array(jax.devices())
    one = NamedSharding(Mesh(devices[:1], ("data",)), P("data"))
    out = global_batch(local, one)
    assert isinstance(out["image"], jax.Array) and out["image"].shape == (16, 8, 8, 1)
    assert len(devices) == 8
    eight = NamedSharding(Mesh(devices, ("data",)), P("data"))
    out = global_batch(local, eight)
    assert out["image"].shape == (16, 8, 8, 1) and out["label"].shape == (16,)
    assert len(out["image"].addressable_shards) == 8
    assert out["image"].addressable_shards[0].data.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(np.asarray(out["image"]), local["image"])
    np.testing.assert_array_equal(np.asarray(out["label"]), local["label"])


# ------------------------------------------------------------------ tfds


def test_center_crop_arr():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)  # h=48, w=64
    out = center_crop_arr(img, 16)
    # ADM by hand: 48 >= 32 so BOX-halve to 32x24; 24 < 32 stops; BICUBIC to 21x16; crop x 2..18.
    pil = Image.fromarray(img).resize((32, 24), Image.BOX).resize((21, 16), Image.BICUBIC)
    np.testing.assert_array_equal(out, np.asarray(pil)[:, 2:18])
    assert center_crop_arr(np.full((40, 30, 1), 7, np.uint8), 8).shape == (8, 8, 1)
    assert (center_crop_arr(np.full((40, 30, 1), 7, np.uint8), 8) == 7).all()
    assert center_crop_arr(img[:10, :12], 16).shape == (16, 16, 3)  # upsampling path


TFDS_IMAGES = [np.random.default_rng(i).integers(0, 256, (20 + 3 * i, 30, 3), dtype=np.uint8)
               for i in range(6)]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny ArrayRecord TFDS dataset, built without TensorFlow (PIL images encode TF-free)."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class SwitchDitTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=6)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, img in enumerate(TFDS_IMAGES):
                yield i, {"image": Image.fromarray(img), "label": i}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    SwitchDitTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_source_and_pipeline(tfds_dir):
    src = TfdsSource("switch_dit_tiny_images", tfds_dir, "train", 16)
    assert len(src) == 6 and src.image_shape == (16, 16, 3) and src.num_classes == 6
    for i in range(6):
        rec = src[i]
        expected = center_crop_arr(TFDS_IMAGES[rec["label"]], 16).astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(rec["image"], expected, atol=1e-6)
    c = cfg(name="tfds", dir=tfds_dir, tfds_name="switch_dit_tiny_images", image_size=16,
            hflip=True)
    b = next(iter(make_train_loader(c, 4)))
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1


def test_tfds_errors(tfds_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.tfds_name='mnist' is not prepared"):
        TfdsSource("mnist", str(tmp_path), "train", 16)
    with pytest.raises(FileNotFoundError, match="data.tfds_name='no_such_ds_xyz'"):
        TfdsSource("no_such_ds_xyz", str(tmp_path), "train", 16)
    with pytest.raises(FileNotFoundError, match="data.dir="):
        TfdsSource("mnist", str(tmp_path / "missing"), "train", 16)
    with pytest.raises(ValueError, match="data.split='validation'"):
        TfdsSource("switch_dit_tiny_images", tfds_dir, "validation", 16)
    with pytest.raises(ValueError, match="data.tfds_name is empty"):
        make_source(cfg(name="tfds"))
