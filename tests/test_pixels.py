"""`python -m switch_dit_jax.data.pixels` as a shard job: two processes split the shards, a
killed run resumes to the bytes of an uninterrupted one, other settings on resume are refused."""
import itertools
import json
import os
import subprocess
import sys
import types

import grain.python as grain
import numpy as np
import pytest
from PIL import Image

from switch_dit_jax.data import images as images_lib
from switch_dit_jax.data import pixels
from switch_dit_jax.data.images import center_crop_arr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = {"ant": 5, "bee": 4, "cow": 4}  # 13 images: 5 shards of 3, the last one short
SIZES = ((40, 24), (16, 16), (20, 33), (64, 48), (17, 30))  # (H, W)
SIZE, SHARD = 16, 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The image folder and, in the order the shards must hold them, (path, label) per image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    expected = []
    for label, (name, count) in enumerate(CLASSES.items()):
        os.makedirs(root / name)
        for i in range(count):
            h, w = SIZES[(label + i) % len(SIZES)]
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            if (label, i) == (1, 2):
                image = image.convert("L")  # a greyscale file must come out as RGB
            path = str(root / name / f"{i:02d}.png")
            image.save(path)
            expected.append((path, label))
    return types.SimpleNamespace(dir=str(root), expected=expected)


def write(folder, out_dir, **kw):
    args = dict(out_dir=str(out_dir), source="folder", image_dir=folder.dir, image_size=SIZE,
                shard_size=SHARD, num_workers=2)
    return pixels.write_from_source(**dict(args, **kw))


def shard_files(out_dir):
    return sorted(f for f in os.listdir(out_dir) if f.endswith(".array_record"))


def read_shard(path):
    source = grain.ArrayRecordDataSource([str(path)])
    return [pixels.decode_pixel_record(source[i]) for i in range(len(source))]


def shard_bytes(out_dir):
    return {f: (out_dir / f).read_bytes() for f in shard_files(out_dir)}


def manifest(out_dir):
    with open(out_dir / "manifest.json") as f:
        return json.load(f)


def test_two_processes_write_disjoint_shards_holding_every_image_once(folder, tmp_path):
    out = tmp_path / "two"
    mine = write(folder, out, process_index=0, process_count=2)
    names = [f"pixels-{i:05d}-of-00005.array_record" for i in range(5)]
    assert [os.path.basename(p) for p in mine] == [names[0], names[2], names[4]]
    assert shard_files(out) == [names[0], names[2], names[4]]
    assert not manifest(out)["complete"]  # process 1's shards are still missing

    # Process 1 through the command line, which also logs its share and its progress.
    cmd = [sys.executable, "-m", "switch_dit_jax.data.pixels", "--source=folder",
           f"--image_dir={folder.dir}", f"--out_dir={out}", f"--image_size={SIZE}",
           f"--shard_size={SHARD}", "--num_workers=2", "--process_index=1",
           "--process_count=2"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[process 1/2] 0 of my 2 shards already complete; writing 6 images in 2" in proc.stderr
    assert "[process 1/2] 6/6 images (100.0%)" in proc.stderr
    assert "pixel writing complete: 13 records (13 images, 0 skipped) in 5 shards" in proc.stderr
    assert shard_files(out) == names

    # Shard i holds images 3i..3i+2 of the folder (classes, then files, in sorted order), each
    # ADM's centre crop of the file as RGB with its class label, and nothing else.
    per_shard = [read_shard(out / name) for name in names]
    assert [len(s) for s in per_shard] == [3, 3, 3, 3, 1]
    records = [r for shard in per_shard for r in shard]
    assert len(records) == len(folder.expected) == 13
    for rec, (path, label) in zip(records, folder.expected):
        want = center_crop_arr(Image.open(path).convert("RGB"), SIZE)
        assert want.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(rec["image"], want, err_msg=path)
        assert (int(rec["label"]), rec["num_classes"]) == (label, 3)
    done = manifest(out)
    assert done["complete"] and (done["num_records"], done["num_skipped"]) == (13, 0)
    assert done["label_map"] == {"ant": 0, "bee": 1, "cow": 2}
    assert (done["num_shards"], done["shard_size"], done["image_size"]) == (5, SHARD, SIZE)
    source = pixels.PixelSource(str(out))  # the training reader takes the joint output
    assert (len(source), source.image_shape, source.num_classes) == (13, (SIZE, SIZE, 3), 3)
    assert shard_bytes(out) == shard_bytes(write_one(folder, tmp_path))


def write_one(folder, tmp_path):
    out = tmp_path / "one"
    if not out.exists():
        write(folder, out)
    return out


def test_killed_run_resumes_to_the_bytes_of_an_uninterrupted_one(folder, tmp_path,
                                                                 monkeypatch, caplog):
    straight = write_one(folder, tmp_path)
    out = tmp_path / "killed"
    calls, real_load = itertools.count(1), images_lib.FolderReader.load

    def load_then_die(self, index):
        if next(calls) == 7:  # the first image of shard 2: shards 0 and 1 are complete
            raise KeyboardInterrupt
        return real_load(self, index)

    monkeypatch.setattr(images_lib.FolderReader, "load", load_then_die)
    with pytest.raises(KeyboardInterrupt):
        write(folder, out)
    monkeypatch.undo()
    names = [f"pixels-{i:05d}-of-00005.array_record" for i in range(5)]
    assert shard_files(out) == names[:2] and not manifest(out)["complete"]
    # What a SIGKILLed writer leaves behind: its shard half written under the .tmp name.
    partial = (straight / names[2]).read_bytes()
    (out / (names[2] + ".tmp")).write_bytes(partial[:len(partial) // 2])
    kept = os.path.getmtime(out / names[0])

    with caplog.at_level("INFO", logger="switch_dit_jax"):
        write(folder, out)
    assert "2 of my 5 shards already complete; writing 7 images in 3 shards" in caplog.text
    assert os.path.getmtime(out / names[0]) == kept  # complete shards are not rewritten
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert shard_bytes(out) == shard_bytes(straight)
    assert manifest(out) == manifest(straight)


def test_resume_with_other_settings_is_refused_naming_the_setting(folder, tmp_path):
    out = write_one(folder, tmp_path)
    before = shard_bytes(out)
    with pytest.raises(ValueError, match=r"holds pixels made with other settings "
                                         r"\(image_size: 16 then, 8 now\); use a new --out_dir"):
        write(folder, out, image_size=8)
    with pytest.raises(ValueError, match=r"other settings \(shard_size: 3 then, 4 now\)"):
        write(folder, out, shard_size=4)
    with pytest.raises(ValueError, match=r"other settings \(num_source_images: 13 then, 5 now"):
        write(folder, out, limit=5)
    with pytest.raises(ValueError, match=r"other settings \(source: .*'labels': 'subfolders'"):
        write(folder, out, labels="none")
    assert shard_bytes(out) == before  # a refused run writes nothing
    with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, process_count=2\)"):
        write(folder, tmp_path / "bad", process_index=2, process_count=2)


def test_unreadable_image_is_named_and_leaves_no_shard(tmp_path):
    flat = tmp_path / "flat"
    os.makedirs(flat)
    Image.fromarray(np.full((20, 20, 3), 7, np.uint8)).save(flat / "0.png")
    (flat / "1.png").write_bytes(b"this is not a PNG")
    with pytest.raises(ValueError, match=f"cannot read image {flat / '1.png'} .*; fix or "
                                         "replace it and rerun"):
        pixels.write_from_source(out_dir=str(tmp_path / "out"), image_dir=str(flat),
                                 image_size=8, num_workers=1)
    assert shard_files(tmp_path / "out") == []
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]
