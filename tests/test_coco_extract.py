"""`extract --source=coco` on a tiny fake COCO: latents and caption embeddings end to end,
resume after an interrupted shard, bad annotation files, and the validation set."""
import itertools
import json
import os
import types

import grain.python as grain
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from fake_text import FakeEncoder
from switch_dit_jax.data import coco
from switch_dit_jax.data import extract as extract_lib
from switch_dit_jax.data.captions import load_empty_caption
from switch_dit_jax.data.pipeline import make_train_loader
from switch_dit_jax.data.images import center_crop_arr
from switch_dit_jax.data.sources import LatentSource, decode_latent_record
from switch_dit_jax.eval import metrics
from tiny_vae import EXTRACT_ARGS, encode, save_tiny_vae

WORDS = "cat dog bus tree red blue small big on a the with".split()
NUM_CAPTIONS = (3, 1, 7, 0, 5, 2, 6, 4, 1, 5)  # image 3 has none


@pytest.fixture(scope="module")
def fake_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    _, weights = save_tiny_vae(root)
    rng = np.random.default_rng(0)
    os.makedirs(root / "train2014")
    images, anns, expected = [], [], {}
    ann_ids = iter(rng.permutation(1000))  # annotation ids in no order, listed shuffled
    for i, n in enumerate(NUM_CAPTIONS):
        image_id = 500 - 37 * i  # ids descend: the records must come out sorted by id
        name = f"COCO_train2014_{image_id:012d}.jpg"
        size = (16, 16) if i % 3 else (16, 24)
        Image.fromarray(rng.integers(0, 256, size + (3,), np.uint8)).save(
            root / "train2014" / name, quality=95)
        images.append({"id": image_id, "file_name": name, "height": size[0], "width": size[1]})
        caps = [(int(next(ann_ids)), " ".join(rng.choice(WORDS, 4))) for _ in range(n)]
        anns += [{"id": a, "image_id": image_id, "caption": c} for a, c in caps]
        if caps:
            expected[image_id] = [c for _, c in sorted(caps)]
    order = rng.permutation(len(anns))
    path = root / "captions_train2014.json"
    path.write_text(json.dumps({"images": images, "annotations": [anns[j] for j in order]}))
    return types.SimpleNamespace(root=root, weights=weights, images=str(root / "train2014"),
                                 annotations=str(path), expected=expected)


def run(fake_coco, out_dir, encoder=None, **kw):
    args = dict(vae=fake_coco.weights, out_dir=str(out_dir), source="coco",
                image_dir=fake_coco.images, annotations=fake_coco.annotations,
                encoder=encoder or FakeEncoder(), image_size=16, batch_size=2, shard_size=2,
                num_workers=2, **EXTRACT_ARGS)
    return extract_lib.extract(**dict(args, **kw))


def raw_records(out_dir):
    shards = sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir)
                    if f.endswith(".array_record"))
    source = grain.ArrayRecordDataSource(shards)
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def extracted(fake_coco):
    out = fake_coco.root / "latents"
    manifest = run(fake_coco, out)
    return out, manifest


def test_records_hold_latents_and_five_captions_per_image(fake_coco, extracted):
    out, manifest = extracted
    records = [decode_latent_record(r) for r in raw_records(out)]
    ids = sorted(fake_coco.expected)  # ascending image id; the uncaptioned image is absent
    assert len(records) == 2 * len(ids) == 18
    enc = FakeEncoder()
    for i, image_id in enumerate(ids):
        caps = fake_coco.expected[image_id]
        want = [caps[j % len(caps)] for j in range(5)]  # first five by id, cyclic when fewer
        hidden, mask = enc.encode(want)
        for rec in records[2 * i:2 * i + 2]:  # the image and its flip carry the same captions
            assert rec["captions"].dtype == np.float16 and rec["captions"].shape == (5, 8, 6)
            np.testing.assert_array_equal(rec["captions"], hidden.astype(np.float16))
            np.testing.assert_array_equal(rec["caption_mask"], mask)
    # The latents: the tiny VAE's posterior of the ADM crop and of its mirror, in id order.
    files = {im_id: os.path.join(fake_coco.images, f"COCO_train2014_{im_id:012d}.jpg")
             for im_id in ids}
    crops = np.stack([center_crop_arr(Image.open(files[i]).convert("RGB"), 16) for i in ids])
    x = crops.astype(np.float32) / 127.5 - 1
    x = np.stack([x, x[:, :, ::-1]], 1).reshape(-1, 16, 16, 3)
    mean, std = encode(fake_coco.weights, x)
    np.testing.assert_allclose(np.stack([r["mean"] for r in records]), mean, atol=2e-5)
    np.testing.assert_allclose(np.stack([r["std"] for r in records]), std, atol=2e-5)

    assert manifest["complete"] and manifest["num_records"] == 18
    assert (manifest["conditioning"], manifest["text_width"], manifest["text_length"]) == (
        "text", 6, 8)
    assert manifest["num_uncaptioned"] == 1 and manifest["num_skipped"] == 0
    assert manifest["captions_per_image"] == 5
    with open(out / "manifest.json") as f:
        assert json.load(f)["conditioning"] == "text"
    text, text_mask = load_empty_caption(ConfigDict(dict(name="latents", dir=str(out))))
    np.testing.assert_array_equal(text, enc.encode([""])[0][0])
    assert text_mask.sum() == 2

    data = ConfigDict(dict(name="latents", dir=str(out), hflip=False, latent_scale=0.18215,
                           seed=0, num_workers=0))
    batch = next(iter(make_train_loader(data, 4)))
    assert set(batch) == {"image", "text", "text_mask"}
    assert batch["image"].shape == (4, 2, 2, 4) and batch["text"].shape == (4, 8, 6)
    assert LatentSource(str(out)).text_shape == (5, 8, 6)


def test_interrupted_extraction_resumes_to_the_same_records(fake_coco, extracted, tmp_path,
                                                            monkeypatch):
    out = tmp_path / "latents"
    calls, real = itertools.count(1), coco.load_rgb

    def load_then_die(path):
        if next(calls) == 6:  # the second image of shard 2: shards 0 and 1 are complete
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(coco, "load_rgb", load_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(fake_coco, out)
    monkeypatch.undo()
    shards = sorted(f for f in os.listdir(out) if f.endswith(".array_record"))
    assert shards == ["latents-00000-of-00005.array_record",
                      "latents-00001-of-00005.array_record"]
    (out / "latents-00002-of-00005.array_record.tmp").write_bytes(b"partial shard")
    manifest = run(fake_coco, out)
    assert manifest["complete"] and manifest["num_records"] == 18
    assert raw_records(out) == raw_records(extracted[0])
    with pytest.raises(ValueError, match=r"other settings \(text_length: 8 then, 9 now\)"):
        run(fake_coco, out, encoder=FakeEncoder(max_length=9))


def write_json(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_bad_coco_inputs_are_one_sentence(fake_coco, tmp_path):
    images = fake_coco.images
    with pytest.raises(FileNotFoundError, match="--annotations=.*nope.json' is not a file"):
        coco.read_annotations(str(tmp_path / "nope.json"), images)
    with pytest.raises(ValueError, match="is not valid JSON"):
        coco.read_annotations(write_json(tmp_path / "a.json", "{\"images\": ["), images)
    with pytest.raises(ValueError, match="not a COCO caption file.*KeyError: 'annotations'"):
        coco.read_annotations(write_json(tmp_path / "b.json", {"images": []}), images)
    orphan = {"images": [], "annotations": [{"id": 1, "image_id": 42, "caption": "a cat"}]}
    with pytest.raises(ValueError, match="caption for image_id=42, which its images list lacks"):
        coco.read_annotations(write_json(tmp_path / "c.json", orphan), images)
    missing = {"images": [{"id": 42, "file_name": "gone.jpg"}],
               "annotations": [{"id": 1, "image_id": 42, "caption": "a cat"}]}
    with pytest.raises(FileNotFoundError, match="image_id=42 .* has no file .*gone.jpg"):
        coco.read_annotations(write_json(tmp_path / "d.json", missing), images)
    with pytest.raises(ValueError, match="--text_encoder is empty.*switch_dit_jax.text.tiny"):
        extract_lib.extract(vae=fake_coco.weights, out_dir=str(tmp_path / "o"), source="coco",
                            image_dir=images, annotations=fake_coco.annotations,
                            image_size=16, **EXTRACT_ARGS)


def test_validation_captions_and_reference_batch(fake_coco, tmp_path):
    enc = FakeEncoder()
    paths = coco.write_val_set(image_dir=fake_coco.images, annotations=fake_coco.annotations,
                               out_dir=str(tmp_path), encoder=enc, num=4, image_size=8,
                               batch_size=3)
    ids = sorted(fake_coco.expected)[:4]
    firsts = [fake_coco.expected[i][0] for i in ids]  # lowest annotation id of each image
    with np.load(paths["captions"]) as f:
        assert list(f["image_ids"]) == ids and list(f["captions"]) == firsts
        hidden, mask = enc.encode(firsts)
        np.testing.assert_array_equal(f["text"], hidden.astype(np.float16))
        assert f["text"].dtype == np.float16
        np.testing.assert_array_equal(f["text_mask"], mask)
        np.testing.assert_array_equal(f["empty_text"], enc.encode([""])[0][0])
        np.testing.assert_array_equal(f["empty_text_mask"], enc.encode([""])[1][0])
    with open(paths["prompts"], encoding="utf-8") as f:
        assert f.read().splitlines() == firsts
    files = [os.path.join(fake_coco.images, f"COCO_train2014_{i:012d}.jpg") for i in ids]
    crops = np.stack([center_crop_arr(Image.open(p).convert("RGB"), 8) for p in files])
    with np.load(paths["reference"]) as f:
        assert f.files == ["arr_0"]
        np.testing.assert_array_equal(f["arr_0"], crops)
    streamed = metrics.NpzImages(paths["reference"])  # what FID reads the reference with
    np.testing.assert_array_equal(streamed[1:3], crops[1:3])
    everything = coco.write_val_set(image_dir=fake_coco.images,
                                    annotations=fake_coco.annotations, out_dir=str(tmp_path),
                                    encoder=enc, image_size=8)
    assert everything["num"] == 9  # default 50K capped at the captioned images
    with pytest.raises(ValueError, match="--num=0 must be a positive integer"):
        coco.write_val_set(image_dir=fake_coco.images, annotations=fake_coco.annotations,
                           out_dir=str(tmp_path), encoder=enc, num=0)
