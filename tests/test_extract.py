"""Latent extraction from an image folder: resume, flips, labels, errors, hosts, training on it."""
import itertools
import json
import logging
import os
import subprocess
import sys
import types

import grain.python as grain
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from switch_dit_jax import sample
from switch_dit_jax import vae as vae_lib
from switch_dit_jax.config_base import load_config
from switch_dit_jax.data import extract as extract_lib
from switch_dit_jax.data.pipeline import make_train_loader
from switch_dit_jax.data.images import ImageFolder, center_crop_arr
from switch_dit_jax.data.sources import LatentSource, decode_latent_record
from switch_dit_jax.train import loop
from tiny_vae import EXTRACT_ARGS, encode, save_tiny_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("cat", "dog", "eel")
SIZES = ((40, 48), (32, 32), (50, 36))  # (H, W): the centre crop meets each aspect


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    _, weights = save_tiny_vae(root)
    rng = np.random.default_rng(0)
    for c in CLASSES:
        os.makedirs(root / "images" / c)
        for i, (h, w) in enumerate(SIZES):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / c / f"{i}.png")
    return types.SimpleNamespace(root=root, weights=weights, images=str(root / "images"))


def run_extract(assets, out_dir, **kw):
    args = dict(vae=assets.weights, out_dir=str(out_dir), source="folder",
                image_dir=assets.images, image_size=32, batch_size=2, shard_size=2,
                num_workers=2, **EXTRACT_ARGS)
    return extract_lib.extract(**dict(args, **kw))


def read_records(out_dir):
    shards = sorted(str(out_dir / f) for f in os.listdir(out_dir) if f.endswith(".array_record"))
    source = grain.ArrayRecordDataSource(shards)
    return [decode_latent_record(source[i]) for i in range(len(source))]


@pytest.fixture(scope="module")
def extracted(assets):
    out = assets.root / "latents"
    run_extract(assets, out)
    return out


def test_interrupted_extraction_resumes_to_one_record_per_image_and_flip(assets, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "latents"
    calls, real_load = itertools.count(1), ImageFolder.load

    def load_then_die(self, index):
        if next(calls) == 5:  # the first image of shard 2: shards 0 and 1 are complete
            raise KeyboardInterrupt
        return real_load(self, index)

    monkeypatch.setattr(ImageFolder, "load", load_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_extract(assets, out)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["latents-00000-of-00005.array_record",
                                       "latents-00001-of-00005.array_record", "manifest.json"]
    # What a SIGKILLed writer leaves behind: a partial shard under its .tmp name.
    (out / "latents-00003-of-00005.array_record.tmp").write_bytes(b"partial shard")
    first_mtime = os.path.getmtime(out / "latents-00000-of-00005.array_record")

    cmd = [sys.executable, "-m", "switch_dit_jax.data.extract", "--source=folder",
           f"--image_dir={assets.images}", f"--vae={assets.weights}", f"--out_dir={out}",
           "--image_size=32", "--batch_size=2", "--shard_size=2", "--num_workers=2",
           "--vae_block_out_channels=8,16,16,16", "--vae_norm_num_groups=4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 of my 5 shards already complete; encoding 5 images" in proc.stderr
    assert os.path.getmtime(out / "latents-00000-of-00005.array_record") == first_mtime
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]

    records = read_records(out)
    folder = ImageFolder(assets.images)
    assert len(records) == 2 * len(folder) == 18
    assert [int(r["label"]) for r in records] == [lab for lab in folder.labels for _ in "ab"]
    assert {r["num_classes"] for r in records} == {3}
    # Record 2i is image i, record 2i+1 its mirror image, both through the ADM centre crop.
    crops = np.stack([center_crop_arr(folder.load(i), 32) for i in range(len(folder))])
    x = crops.astype(np.float32) / 127.5 - 1
    mean, std = encode(assets.weights, np.stack([x, x[:, :, ::-1]], 1).reshape(-1, 32, 32, 3))
    np.testing.assert_allclose(np.stack([r["mean"] for r in records]), mean, atol=2e-5)
    np.testing.assert_allclose(np.stack([r["std"] for r in records]), std, atol=2e-5)

    with open(out / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["complete"] and manifest["num_records"] == 18
    assert (manifest["num_images"], manifest["num_skipped"]) == (9, 0)
    assert manifest["label_map"] == {"cat": 0, "dog": 1, "eel": 2}
    assert manifest["vae_sha256"] == vae_lib.sha256_file(assets.weights)
    assert manifest["latent_shape"] == [4, 4, 4] and manifest["image_size"] == 32

    source = LatentSource(str(out))
    assert (len(source), source.image_shape, source.num_classes) == (18, (4, 4, 4), 3)
    data = ConfigDict(dict(name="latents", dir=str(out), hflip=False, latent_scale=0.18215,
                           seed=0, num_workers=0))
    batch = next(iter(make_train_loader(data, 6)))
    assert batch["image"].shape == (6, 4, 4, 4) and set(batch["label"]) <= {0, 1, 2}


def test_unreadable_image_fails_or_is_skipped(assets, tmp_path):
    flat = tmp_path / "flat"
    os.makedirs(flat)
    for i in range(2):
        Image.fromarray(np.full((32, 40, 3), 60 * i, np.uint8)).save(flat / f"{i}.jpg")
    (flat / "1b.png").write_bytes(b"this is not a PNG")
    with pytest.raises(extract_lib.ImageReadError, match=f"{flat / '1b.png'}.*--on_error=skip"):
        run_extract(assets, tmp_path / "fail", image_dir=str(flat), shard_size=10)
    assert not [f for f in os.listdir(tmp_path / "fail") if "array_record" in f]

    manifest = run_extract(assets, tmp_path / "skip", image_dir=str(flat), on_error="skip")
    assert (manifest["num_records"], manifest["num_skipped"]) == (4, 1)
    assert manifest["num_classes"] == 1 and manifest["label_map"] == {}
    assert LatentSource(str(tmp_path / "skip")).num_classes == 1


def test_extraction_from_tfds(assets, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    pictures = [np.random.default_rng(i).integers(0, 256, (24 + 4 * i, 36, 3), dtype=np.uint8)
                for i in range(3)]

    class SwitchDitExtractImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(names=["ant", "bee", "cow"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, picture in enumerate(pictures):
                yield i, {"image": Image.fromarray(picture), "label": i}

    data_dir = str(tmp_path / "tfds")
    SwitchDitExtractImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
    manifest = run_extract(assets, tmp_path / "out", source="tfds", image_dir=None,
                           tfds_name="switch_dit_extract_images", data_dir=data_dir)
    assert manifest["num_records"] == 6 and manifest["num_classes"] == 3
    assert manifest["label_map"] == {"ant": 0, "bee": 1, "cow": 2}
    records = read_records(tmp_path / "out")
    crops = np.stack([center_crop_arr(pictures[int(r["label"])], 32) for r in records[::2]])
    mean, _ = encode(assets.weights, crops.astype(np.float32) / 127.5 - 1)
    np.testing.assert_allclose(np.stack([r["mean"] for r in records[::2]]), mean, atol=2e-5)


def test_hosts_split_the_shards_and_resume_checks_settings(assets, extracted, tmp_path):
    out = tmp_path / "hosts"
    first = run_extract(assets, out, shard_size=4, process_index=0, process_count=2)
    assert not first["complete"]  # process 1's shard is still missing
    assert sorted(f for f in os.listdir(out) if f.endswith(".array_record")) == [
        "latents-00000-of-00003.array_record", "latents-00002-of-00003.array_record"]
    last = run_extract(assets, out, shard_size=4, process_index=1, process_count=2)
    assert last["complete"] and last["num_records"] == 18
    by_host = read_records(out)
    for a, b in zip(by_host, read_records(extracted), strict=True):
        np.testing.assert_allclose(a["mean"], b["mean"], atol=2e-5)
        assert a["label"] == b["label"]
    with pytest.raises(ValueError, match="other settings \\(image_size: 32 then, 64 now\\)"):
        run_extract(assets, out, shard_size=4, image_size=64)


def test_write_samples_without_vae_keeps_latents(assets, tmp_path, monkeypatch, caplog):
    config = load_config(os.path.join(ROOT, "configs", "quickstart.py"),
                         {"data.name": "latents", "model.in_channels": 4})
    latents = np.random.default_rng(0).normal(size=(8, 4, 4, 4)).astype(np.float32)
    monkeypatch.setattr(sample, "generate", lambda *a, **k: (latents, np.arange(8) % 3))
    state = types.SimpleNamespace(step=7, ema_params=None, ema_model_state=None)
    with caplog.at_level(logging.WARNING, logger="switch_dit_jax"):
        paths = loop.write_samples(None, config, state, None,
                                   types.SimpleNamespace(ema_params=None), str(tmp_path))
    assert paths == {"npz": str(tmp_path / "samples" / "latents_00000007.npz")}
    assert "config.vae.weights is empty" in caplog.text
    with np.load(paths["npz"]) as f:
        np.testing.assert_array_equal(f["arr_0"], latents)
    assert not os.path.exists(tmp_path / "samples" / "samples_00000007.png")


def test_training_on_extracted_latents_writes_decoded_samples(assets, extracted, tmp_path):
    config = load_config(os.path.join(ROOT, "configs", "quickstart.py"), {
        "model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2, "model.patch_size": 2,
        "model.input_size": 4, "model.in_channels": 4, "model.num_classes": 3,
        "data.name": "latents", "data.dir": str(extracted), "data.hflip": False,
        "train.global_batch_size": 8, "train.num_steps": 2, "train.log_every": 1,
        "train.checkpoint_every": 2, "train.sample_every": 2, "train.warmup_steps": 1,
        "train.async_checkpointing": False,
        "sample.num_samples": 8, "sample.batch_size": 8, "sample.num_steps": 2,
        "sample.clip_denoised": False, "sample.cfg_scale": 1.0,
        "vae.weights": assets.weights, "vae.block_out_channels": (8, 16, 16, 16),
        "vae.norm_num_groups": 4})
    vae_lib.check_config(config)
    loop.train_and_evaluate(config, str(tmp_path))
    with np.load(tmp_path / "samples" / "samples_00000002.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (8, 32, 32, 3)
    assert labels.shape == (8,) and images.std() > 0
    grid = Image.open(tmp_path / "samples" / "samples_00000002.png")
    assert grid.mode == "RGB" and grid.size == (200, 200)  # 3x3 cells of 32+1 px, 2x upscaled
