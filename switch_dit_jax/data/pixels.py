"""Pixel-space data (the ADM half of DTR Table 1): images stored once as uint8 ArrayRecord.

    python -m switch_dit_jax.data.pixels --source=folder --image_dir=/data/ffhq \
        --image_size=64 --out_dir=/data/ffhq64

Every image gets ADM's `center_crop_arr` (BOX-halve while the short side is >= 2x the size,
BICUBIC to the size, centre crop) and is written as one record; training reads them with
`data.name="pixels"`, `data.dir=<out_dir>`, scales them to [-1, 1] and flips them at random
(`data.hflip=True`), so neither the crop nor a flip is ever recomputed from the source files.

Record format (little-endian): magic b"PXU8", int32[5] h, w, c, label, num_classes
(0 = unknown), then uint8[h, w, c] (C-order). Shards `pixels-{i:05d}-of-{n:05d}.array_record`
hold images [i·shard_size, (i+1)·shard_size) and are written as `extract.py` writes latents
(`shard_jobs.py`): process p of `--process_count` P writes shards p, p+P, ... (P hosts or P
processes of one host, no coordinator needed), a rerun skips complete shards and redoes a
partial one, and `manifest.json` holds the settings (a resume with others is refused) and,
once every shard exists, the record count.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import struct
import sys

import numpy as np

import grain.python as grain

from switch_dit_jax.data import shard_jobs
from switch_dit_jax.data.images import CROP, make_reader
from switch_dit_jax.errors import BadFileError

PIXEL_MAGIC = b"PXU8"
_HEADER = struct.Struct("<4s5i")
PREFIX = "pixels"


def encode_pixel_record(image, label: int, num_classes: int = 0) -> bytes:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"a pixel record holds a uint8 [h, w, c] image, not {image.dtype} "
                         f"{image.shape}.")
    h, w, c = image.shape
    return _HEADER.pack(PIXEL_MAGIC, h, w, c, int(label), int(num_classes or 0)) + \
        np.ascontiguousarray(image).tobytes()


def decode_pixel_record(record: bytes) -> dict:
    if len(record) < _HEADER.size or record[:4] != PIXEL_MAGIC:
        raise ValueError(f"record does not start with the {PIXEL_MAGIC!r} header of a pixel "
                         "record written by switch_dit_jax.data.pixels")
    _, h, w, c, label, num_classes = _HEADER.unpack_from(record, 0)
    if min(h, w, c) < 1 or len(record) != _HEADER.size + h * w * c:
        raise ValueError(f"record has {len(record)} bytes but its header announces a uint8 "
                         f"({h}, {w}, {c}) image: the record is damaged")
    image = np.frombuffer(record, np.uint8, h * w * c, _HEADER.size).reshape(h, w, c)
    return {"image": image, "label": np.int32(label), "num_classes": num_classes}


def write_pixel_shards(out_dir: str, records, n: int, num_classes: int,
                       num_shards: int = 1) -> list[str]:
    """`n` in-memory (uint8 image [h, w, c], label) pairs (any iterable) -> `num_shards` shards."""
    if n <= 0:
        raise ValueError("no images to write.")
    if not 1 <= num_shards <= n:
        raise ValueError(f"num_shards={num_shards} must be between 1 and the image count {n}.")
    os.makedirs(out_dir, exist_ok=True)
    records = iter(records)
    paths = []
    for i, idx in enumerate(np.array_split(np.arange(n), num_shards)):
        with shard_jobs.RecordShard(os.path.join(
                out_dir, shard_jobs.shard_name(PREFIX, i, num_shards))) as shard:
            for _ in idx:
                image, label = next(records)
                shard.write(encode_pixel_record(image, label, num_classes))
        paths.append(shard.path)
    return paths


class PixelSource:
    """uint8 pixel records of a directory -> {"image": float32 [-1, 1] HWC, "label"}."""

    def __init__(self, data_dir: str):
        if not data_dir or not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data.dir={data_dir!r} does not exist; point it at the "
                                    "*.array_record pixel shards written by "
                                    "`python -m switch_dit_jax.data.pixels`.")
        names = sorted(f for f in os.listdir(data_dir) if f.endswith(".array_record"))
        if not names:
            raise FileNotFoundError(f"data.dir={data_dir!r} contains no *.array_record shards; "
                                    "write them with `python -m switch_dit_jax.data.pixels`.")
        self._names = names
        self._source = grain.ArrayRecordDataSource([os.path.join(data_dir, f) for f in names])
        first = self._record(0)
        self.image_shape = tuple(first["image"].shape)
        self.num_classes = first["num_classes"] or None

    def _record(self, index: int) -> dict:
        try:
            rec = decode_pixel_record(self._source[index])
        except (ValueError, RuntimeError) as e:
            raise BadFileError(f"record {index} of the pixel shards {self._names} cannot be "
                               f"read ({str(e).splitlines()[0].rstrip('.')}); rewrite the "
                               "shards, or move foreign files out of data.dir.") from None
        if getattr(self, "image_shape", None) and rec["image"].shape != self.image_shape:
            raise BadFileError(f"record {index} of the pixel shards holds a "
                               f"{rec['image'].shape} image but the first one is "
                               f"{self.image_shape}; every shard must come from one writing.")
        return rec

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        rec = self._record(index)
        return {"image": rec["image"].astype(np.float32) / 127.5 - 1.0, "label": rec["label"]}

    def __repr__(self) -> str:
        return f"PixelSource(shards={self._names!r}, num_records={len(self)})"


# Settings that decide what the shards contain; a resumed run must repeat them exactly.
_RESUME_KEYS = ("source", "num_source_images", "image_size", "shard_size", "num_shards",
                "label_map")


def write_from_source(*, out_dir: str, source: str = "folder", image_dir: str | None = None,
                      labels: str = "auto", tfds_name: str = "imagenet2012",
                      data_dir: str | None = None, split: str = "train", image_size: int = 64,
                      shard_size: int = 10_000, limit: int = 0, num_workers: int = 8,
                      process_index: int | None = None, process_count: int | None = None,
                      log_every_s: float = 30.0) -> list[str]:
    """Centre-crops this process's shards of a folder or a TFDS split into uint8 RGB pixel
    shards, streaming (ImageNet-64 is 16 GB as uint8); returns the paths of its shards."""
    shard_jobs.check_positive(image_size=image_size, shard_size=shard_size)
    if not out_dir:
        raise ValueError("--out_dir is empty; pass the directory to write the pixel shards to.")
    reader = make_reader(source, image_dir=image_dir, labels=labels, tfds_name=tfds_name,
                         data_dir=data_dir, split=split, image_size=image_size)
    n = min(len(reader), limit) if limit else len(reader)
    job = shard_jobs.ShardJob.create(out_dir, PREFIX, n, shard_size, process_index,
                                     process_count)
    manifest = {
        "format": "PXU8 ArrayRecord pixel shards (switch_dit_jax.data.pixels)",
        "source": reader.description, "num_source_images": n, "crop": CROP,
        "image_size": image_size, "records": "one uint8 [h, w, 3] image per source image "
                                             "(train with data.hflip=True)",
        "shard_size": shard_size, "num_shards": job.num_shards, "shard_prefix": PREFIX,
        "num_classes": reader.num_classes, "label_map": reader.label_map, "complete": False,
    }
    shard_jobs.start(job, manifest, _RESUME_KEYS, "pixels")

    def load(index):
        try:
            return reader.load(index)
        except Exception as e:  # noqa: BLE001 -- whatever the decoder raised, it is the file's
            raise ValueError(f"cannot read image {reader.name(index)} ({e}); fix or replace it "
                             "and rerun, which keeps the complete shards.") from e

    def write_shard(shard, indices, progress):
        with shard_jobs.RecordShard(job.path(shard)) as writer:
            for image, label in pool.map(load, indices):  # in order: reproducible bytes
                writer.write(encode_pixel_record(image, label, reader.num_classes))
                progress.add(1)
        return writer

    pool = concurrent.futures.ThreadPoolExecutor(max(1, num_workers))
    try:
        shard_jobs.run(job, write_shard, log_every_s)
    finally:  # a failed read or a kill drops the shard's queued reads instead of awaiting them
        pool.shutdown(wait=True, cancel_futures=True)
    shard_jobs.finish(job, manifest, 1, "pixel writing")
    return [job.path(s) for s in job.mine()]


def _main(argv) -> None:
    del argv
    from absl import flags
    f = flags.FLAGS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if not f.out_dir:
        sys.exit("error: pass --out_dir=DIR for the pixel shards.")
    shard_jobs.init_distributed(f.coordinator_address, f.num_processes, f.process_id)
    names = ("out_dir", "source", "image_dir", "labels", "tfds_name", "data_dir", "split",
             "image_size", "shard_size", "limit", "num_workers", "process_index",
             "process_count")
    try:
        paths = write_from_source(**{k: getattr(f, k) for k in names})
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"{len(paths)} shard(s) of this process in {f.out_dir}")


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_enum("source", "folder", ["folder", "tfds"], "Where the images come from.")
    flags.DEFINE_string("image_dir", None, "--source=folder: the image folder.")
    flags.DEFINE_enum("labels", "auto", ["auto", "subfolders", "none"],
                      "--source=folder: class subfolders, or none (one class: FFHQ).")
    flags.DEFINE_string("tfds_name", "imagenet2012", "--source=tfds: the dataset name.")
    flags.DEFINE_string("data_dir", None, "--source=tfds: the TFDS data_dir.")
    flags.DEFINE_string("split", "train", "--source=tfds: the split.")
    flags.DEFINE_string("out_dir", None, "Directory for the shards and manifest.json.")
    flags.DEFINE_integer("image_size", 64, "ADM centre-crop size.")
    flags.DEFINE_integer("shard_size", 10_000, "Images per shard.")
    flags.DEFINE_integer("limit", 0, "Only the first N images (0 = all).")
    flags.DEFINE_integer("num_workers", 8, "Threads that read and crop images.")
    flags.DEFINE_integer("process_index", None, "This process's index p: it writes shards p, "
                         "p+P, ... (default: jax.process_index()).")
    flags.DEFINE_integer("process_count", None, "P, the processes sharing the shards "
                         "(default: jax.process_count()).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (jax.distributed).")
    flags.DEFINE_integer("num_processes", None, "Processes of a jax.distributed run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a jax.distributed run.")
    app.run(_main)
