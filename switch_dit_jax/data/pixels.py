"""Pixel-space data (the ADM half of DTR Table 1): images stored once as uint8 ArrayRecord.

    python -m switch_dit_jax.data.pixels --source=folder --image_dir=/data/ffhq \
        --image_size=64 --out_dir=/data/ffhq64

Every image gets ADM's `center_crop_arr` (BOX-halve while the short side is >= 2x the size,
BICUBIC to the size, centre crop) and is written as one record; training reads them with
`data.name="pixels"`, `data.dir=<out_dir>`, scales them to [-1, 1] and flips them at random
(`data.hflip=True`), so neither the crop nor a flip is ever recomputed from the source files.

Record format (little-endian): magic b"PXU8", int32[5] h, w, c, label, num_classes
(0 = unknown), then uint8[h, w, c] (C-order). Shards `pixels-{i:05d}-of-{n:05d}.array_record`
are written under `.tmp` and renamed when complete.
"""
from __future__ import annotations

import os
import struct
import sys

import numpy as np

import grain.python as grain

from switch_dit_jax.data.sources import ImageFolder, TfdsSource, center_crop_arr, shard_name
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
    """`n` (uint8 image [h, w, c], label) pairs (any iterable) -> `num_shards` shards."""
    from array_record.python.array_record_module import ArrayRecordWriter
    if n <= 0:
        raise ValueError("no images to write.")
    if not 1 <= num_shards <= n:
        raise ValueError(f"num_shards={num_shards} must be between 1 and the image count {n}.")
    os.makedirs(out_dir, exist_ok=True)
    records = iter(records)
    paths = []
    for i, idx in enumerate(np.array_split(np.arange(n), num_shards)):
        path = os.path.join(out_dir, shard_name(PREFIX, i, num_shards))
        writer = ArrayRecordWriter(path + ".tmp", "group_size:1")
        for _ in idx:
            image, label = next(records)
            writer.write(encode_pixel_record(image, label, num_classes))
        writer.close()
        os.replace(path + ".tmp", path)
        paths.append(path)
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


def _rgb(image: np.ndarray) -> np.ndarray:
    return image[..., :3] if image.shape[-1] >= 3 else np.repeat(image, 3, axis=-1)


def write_from_source(*, out_dir: str, source: str = "folder", image_dir: str | None = None,
                      labels: str = "auto", tfds_name: str = "imagenet2012",
                      data_dir: str | None = None, split: str = "train", image_size: int = 64,
                      shard_size: int = 10_000, limit: int = 0) -> list[str]:
    """Centre-crop every image of a folder or a TFDS split into uint8 RGB pixel shards,
    streaming (ImageNet-64 is 16 GB as uint8)."""
    if source == "folder":
        folder = ImageFolder(image_dir, labels)
        n, num_classes = len(folder), folder.num_classes

        def record(i):
            return center_crop_arr(folder.load(i), image_size), folder.labels[i]
    elif source == "tfds":
        tfds_source = TfdsSource(tfds_name, data_dir, split, image_size)
        n, num_classes = len(tfds_source), tfds_source.num_classes or 1

        def record(i):  # TfdsSource crops as ADM does, to float in [-1, 1]: back to the bytes
            rec = tfds_source[i]
            return np.rint((rec["image"] + 1.0) * 127.5).astype(np.uint8), int(rec["label"])
    else:
        raise ValueError(f"--source={source!r}; use 'folder' or 'tfds'.")
    n = min(n, limit or n)
    records = ((_rgb(image), label) for image, label in map(record, range(n)))
    return write_pixel_shards(out_dir, records, n, num_classes, max(1, -(-n // shard_size)))


def _main(argv) -> None:
    del argv
    from absl import flags
    f = flags.FLAGS
    if not f.out_dir:
        sys.exit("error: pass --out_dir=DIR for the pixel shards.")
    try:
        paths = write_from_source(out_dir=f.out_dir, source=f.source, image_dir=f.image_dir,
                                  labels=f.labels, tfds_name=f.tfds_name, data_dir=f.data_dir,
                                  split=f.split, image_size=f.image_size,
                                  shard_size=f.shard_size, limit=f.limit)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {len(paths)} shard(s) to {f.out_dir}")


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_enum("source", "folder", ["folder", "tfds"], "Where the images come from.")
    flags.DEFINE_string("image_dir", None, "--source=folder: the image folder.")
    flags.DEFINE_enum("labels", "auto", ["auto", "subfolders", "none"],
                      "--source=folder: class subfolders, or none (one class: FFHQ).")
    flags.DEFINE_string("tfds_name", "imagenet2012", "--source=tfds: the dataset name.")
    flags.DEFINE_string("data_dir", None, "--source=tfds: the TFDS data_dir.")
    flags.DEFINE_string("split", "train", "--source=tfds: the split.")
    flags.DEFINE_string("out_dir", None, "Directory for the shards.")
    flags.DEFINE_integer("image_size", 64, "ADM centre-crop size.")
    flags.DEFINE_integer("shard_size", 10_000, "Images per shard.")
    flags.DEFINE_integer("limit", 0, "Only the first N images (0 = all).")
    app.run(_main)
