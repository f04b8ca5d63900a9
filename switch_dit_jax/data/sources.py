"""Random-access data sources for grain: sklearn digits, ArrayRecord VAE latents, TFDS images.
(The image files and readers that the offline shard writers use are in `images.py`.)

Every source has `__len__`, `__getitem__`, `image_shape` (H, W, C of what the training
pipeline yields) and `num_classes` (None when unknown).  A deterministic `__repr__` matters:
grain stores `repr(source)` in iterator checkpoints and refuses to restore on a mismatch.

Latent record format (the contract between latent extraction and training)
--------------------------------------------------------------------------
One ArrayRecord record per image, all integers/floats little-endian:

    bytes 0..3    magic b"SDL1"
    bytes 4..23   int32[5]: h, w, c, label, num_classes (0 = unknown)
    then          float32[h, w, c] VAE posterior mean (unscaled, C-order)
    then          float32[h, w, c] VAE posterior std  (unscaled, C-order)
    then          (captioned records only) the caption block of `captions.py`: b"TXT1",
                  int32[3] K, L, D, float16[K, L, D] text embeddings, uint8[K, L] token mask

Shards are named `{prefix}-{i:05d}-of-{n:05d}.array_record`; `LatentSource` reads every
`*.array_record` in a directory in sorted order.  The 0.18215 latent scale is applied by the
pipeline, not stored.  Shards are written under a `.tmp` suffix and renamed on close, so a
crashed writer never leaves a file that matches `*.array_record`.
"""
from __future__ import annotations

import os
import struct

import numpy as np

import grain.python as grain

from switch_dit_jax.data.captions import (DigitsTextSource, decode_caption_block,
                                          encode_caption_block)
from switch_dit_jax.data.images import center_crop_arr
from switch_dit_jax.data.shard_jobs import RecordShard, shard_name
from switch_dit_jax.errors import BadFileError

LATENT_MAGIC = b"SDL1"
_HEADER = struct.Struct("<4s5i")
DATA_NAMES = ("digits", "digits_text", "latents", "tfds", "pixels")


def _field(cfg, name, default=None):
    """Reads a config field from an ml_collections.ConfigDict, a dict or a plain object."""
    if hasattr(cfg, "get"):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


# ----------------------------------------------------------------------------- digits


class DigitsSource:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes); needs no download."""

    image_shape = (8, 8, 1)
    num_classes = 10

    def __init__(self):
        from sklearn.datasets import load_digits  # lazy: sklearn import is slow
        digits = load_digits()
        self._images = (digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[..., None]
        self._labels = digits.target.astype(np.int32)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self._images[index], "label": self._labels[index]}

    def __repr__(self) -> str:
        return "DigitsSource()"


# ----------------------------------------------------------------------------- latents


def encode_latent_record(mean, std, label: int, num_classes: int = 0, captions=None,
                         caption_mask=None) -> bytes:
    mean = np.asarray(mean, dtype="<f4")
    std = np.asarray(std, dtype="<f4")
    if mean.ndim != 3 or mean.shape != std.shape:
        raise ValueError(f"latent mean/std must both be [h, w, c]; got {mean.shape} and {std.shape}.")
    h, w, c = mean.shape
    header = _HEADER.pack(LATENT_MAGIC, h, w, c, int(label), int(num_classes or 0))
    body = np.ascontiguousarray(mean).tobytes() + np.ascontiguousarray(std).tobytes()
    if captions is None:
        return header + body
    return header + body + encode_caption_block(captions, caption_mask)


def decode_latent_record(record: bytes) -> dict:
    if len(record) < _HEADER.size:
        raise ValueError(f"record has {len(record)} bytes, fewer than the {_HEADER.size}-byte "
                         "latent header: not a latent shard written by LatentShardWriter.")
    magic, h, w, c, label, num_classes = _HEADER.unpack_from(record, 0)
    if magic != LATENT_MAGIC:
        raise ValueError(f"record starts with {magic!r}, not {LATENT_MAGIC!r}: not a latent shard "
                         "written by switch_dit_jax.data.sources.LatentShardWriter.")
    n = h * w * c
    end = _HEADER.size + 8 * n
    if min(h, w, c) < 1 or len(record) < end:
        raise ValueError(f"record has {len(record)} bytes but its header announces float32 "
                         f"mean and std of shape ({h}, {w}, {c}): the record is damaged.")
    flat = np.frombuffer(record, dtype="<f4", count=2 * n, offset=_HEADER.size)
    rec = {
        "mean": flat[:n].reshape(h, w, c).astype(np.float32),
        "std": flat[n:].reshape(h, w, c).astype(np.float32),
        "label": np.int32(label),
        "num_classes": num_classes,
    }
    if len(record) > end:
        rec.update(decode_caption_block(record, end))
    return rec


class LatentShardWriter(RecordShard):
    """Streams latent records into one ArrayRecord shard; visible only after `close()`.

    Use as a context manager: an exception inside the block discards the partial shard.
    """

    def __init__(self, out_dir: str, shard_index: int = 0, num_shards: int = 1,
                 prefix: str = "latents", num_classes: int | None = None):
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index={shard_index} must be in [0, num_shards={num_shards}).")
        os.makedirs(out_dir, exist_ok=True)
        super().__init__(os.path.join(out_dir, shard_name(prefix, shard_index, num_shards)))
        self._num_classes = num_classes

    def write(self, mean, std, label, captions=None, caption_mask=None) -> None:
        label = int(label)
        if self._num_classes and not 0 <= label < self._num_classes:
            raise ValueError(f"label={label} is outside [0, num_classes={self._num_classes}).")
        super().write(encode_latent_record(mean, std, label, self._num_classes or 0, captions,
                                           caption_mask))


def write_latent_shards(out_dir: str, means, stds, labels, num_shards: int = 1,
                        prefix: str = "latents", num_classes: int | None = None) -> list[str]:
    """Writes in-memory latents ([n,h,w,c] means/stds, [n] labels) as `num_shards` shards."""
    means, stds, labels = np.asarray(means), np.asarray(stds), np.asarray(labels)
    n = len(labels)
    if not len(means) == len(stds) == n:
        raise ValueError(f"means, stds and labels disagree on the record count: "
                         f"{len(means)}, {len(stds)}, {n}.")
    if not 1 <= num_shards <= max(n, 1):
        raise ValueError(f"num_shards={num_shards} must be between 1 and the record count ({n}).")
    paths = []
    for i, idx in enumerate(np.array_split(np.arange(n), num_shards)):
        with LatentShardWriter(out_dir, i, num_shards, prefix, num_classes) as writer:
            for j in idx:
                writer.write(means[j], stds[j], labels[j])
        paths.append(writer.path)
    return paths


def _shard_records(path: str) -> int:
    from array_record.python.array_record_module import ArrayRecordReader
    try:
        reader = ArrayRecordReader(path)
        try:
            return reader.num_records()
        finally:
            reader.close()
    except RuntimeError as e:
        raise BadFileError(f"latent shard {path!r} is not a readable ArrayRecord file "
                           f"({_first_line(e)}); it is truncated or corrupt, so delete it and "
                           "re-run the extraction, which redoes missing shards.") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "the reader gives no detail"


class LatentSource:
    """Pre-extracted VAE latents from `*.array_record` shards; yields unscaled mean/std/label
    (and `captions` / `caption_mask` for captioned records, `text_shape` (K, L, D)).

    Each record is checked as it is decoded (on the host, in grain's reader threads, at a cost
    of microseconds next to a train step): a damaged or foreign record, NaN or inf latents, a
    negative std, a label outside [0, num_classes) or a shape unlike the first record's stop
    the run with one sentence naming the shard file and the record index in it.
    """

    def __init__(self, data_dir: str):
        if not data_dir or not os.path.isdir(data_dir):
            raise FileNotFoundError(
                f"data.dir={data_dir!r} does not exist; point data.dir at the directory of "
                "*.array_record latent shards written by the latent extraction script.")
        names = sorted(f for f in os.listdir(data_dir) if f.endswith(".array_record"))
        if not names:
            raise FileNotFoundError(
                f"data.dir={data_dir!r} contains no *.array_record shards; run latent extraction "
                "into it first (shards still being written end in .tmp and are ignored).")
        self._names = names
        self._paths = [os.path.join(data_dir, f) for f in names]
        # Opening each shard alone names the bad one; grain's source would only say that one is.
        counts = [_shard_records(p) for p in self._paths]
        self._starts = np.cumsum([0] + counts)
        self._source = grain.ArrayRecordDataSource(self._paths)
        if len(self._source) == 0:
            raise ValueError(f"data.dir={data_dir!r} holds only empty shards; re-run latent extraction.")
        self.image_shape, self.num_classes, self.text_shape = None, None, None
        first = self._record(0)
        self.image_shape = tuple(first["mean"].shape)
        self.num_classes = first["num_classes"] or None
        # (K, L, D) of captioned records (COCO), None for class-labelled ones.
        self.text_shape = first["captions"].shape if "captions" in first else None

    def _where(self, index: int) -> str:
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return f"record {index - int(self._starts[shard])} of latent shard {self._paths[shard]!r}"

    def _record(self, index: int) -> dict:
        try:
            raw = self._source[index]
        except RuntimeError as e:
            raise BadFileError(f"{self._where(index)} cannot be read ({_first_line(e)}); the shard "
                               "is corrupt, so delete it and re-run the extraction.") from None
        try:
            rec = decode_latent_record(raw)
        except ValueError as e:
            raise BadFileError(f"{self._where(index)} is not a latent record "
                               f"({str(e).rstrip('.')}); delete the shard and re-run the "
                               "extraction, or move foreign files out of data.dir.") from None
        problem = self._problem(rec)
        if problem:
            raise BadFileError(f"{self._where(index)} {problem}")
        return rec

    def _problem(self, rec: dict) -> str | None:
        shape, label, k = rec["mean"].shape, int(rec["label"]), rec["num_classes"]
        if self.image_shape is not None and shape != self.image_shape:
            return (f"holds latents of shape {shape} but the first record's are "
                    f"{self.image_shape}; every shard of data.dir must come from one extraction.")
        if self.image_shape is not None and (k or None) != self.num_classes:
            return (f"declares num_classes={k} but the first record "
                    f"num_classes={self.num_classes or 0}; "
                    "every shard of data.dir must come from one extraction.")
        text_shape = rec["captions"].shape if "captions" in rec else None
        if self.image_shape is not None and text_shape != self.text_shape:
            return (f"holds captions of shape {text_shape} but the first record's are "
                    f"{self.text_shape}; every shard of data.dir must come from one extraction.")
        if label < 0 or (k and label >= k):
            return (f"has label {label}, outside [0, num_classes={k or '?'}) that the shard "
                    "declares; re-extract it with a label map that covers every class.")
        for name in ("mean", "std"):
            bad = ~np.isfinite(rec[name])
            if bad.any():
                return (f"holds {int(bad.sum())} NaN or inf value(s) in its latent {name}; "
                        "the VAE encoding failed there, so re-extract the shard.")
        if text_shape is not None and not np.isfinite(rec["captions"]).all():
            return ("holds NaN or inf caption embeddings; the text encoding failed there (or "
                    "overflowed float16), so re-extract the shard.")
        if (rec["std"] < 0).any():
            return "holds a negative latent std; re-extract the shard."
        return None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        rec = self._record(index)
        rec.pop("num_classes")
        return rec

    def __repr__(self) -> str:
        # Names and count, not the absolute dir, so a checkpoint survives moving the shards.
        return f"LatentSource(shards={self._names!r}, num_records={len(self)})"


# ----------------------------------------------------------------------------- tfds


class TfdsSource:
    """A TFDS dataset prepared as ArrayRecord, centre-cropped to `image_size`, in [-1, 1]."""

    def __init__(self, tfds_name: str, data_dir: str | None, split: str = "train",
                 image_size: int = 256):
        import tensorflow_datasets as tfds  # lazy: heavy import, only needed for this source
        if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
            raise ValueError(f"data.image_size={image_size!r} must be a positive integer.")
        if data_dir and not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data.dir={data_dir!r} does not exist; set data.dir to the TFDS "
                                    f"data_dir holding the prepared {tfds_name!r} dataset.")
        hint = (f"prepare it with `tfds build {tfds_name} --data_dir={data_dir or '<default>'} "
                "--file_format=array_record` (random access needs ArrayRecord)")
        try:
            builder = tfds.builder(tfds_name, data_dir=data_dir or None)
        except tfds.core.registered.DatasetNotFoundError:
            raise FileNotFoundError(f"data.tfds_name={tfds_name!r} is neither a known TFDS dataset nor "
                                    f"prepared in data.dir={data_dir!r}; check the name or {hint}.") from None
        if not builder.is_prepared():
            raise FileNotFoundError(f"data.tfds_name={tfds_name!r} is not prepared in "
                                    f"data.dir={data_dir!r}; {hint}.")
        fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
        if fmt != "array_record":
            raise ValueError(f"data.tfds_name={tfds_name!r} in data.dir={data_dir!r} is stored as "
                             f"{fmt}, not ArrayRecord; {hint}.")
        base_split = split.split("[")[0]
        if "+" not in split and base_split not in builder.info.splits:
            raise ValueError(f"data.split={split!r} is not a split of {tfds_name!r}; choose one of "
                             f"{sorted(builder.info.splits)}.")
        self._source = builder.as_data_source(split=split)
        features = builder.info.features
        if "image" not in features or "label" not in features:
            raise ValueError(f"data.tfds_name={tfds_name!r} lacks an 'image' or 'label' feature; "
                             "only labelled image datasets are supported.")
        channels = features["image"].shape[-1] or 3
        self.image_shape = (image_size, image_size, channels)
        self.num_classes = getattr(features["label"], "num_classes", None)
        self._desc = (tfds_name, split, image_size, len(self._source))
        self._image_size = int(image_size)

    def __len__(self) -> int:
        return len(self._source)

    def crop(self, index: int):
        """(uint8 centre crop, label) of record `index`: what the pixel shards store."""
        rec = self._source[index]
        return center_crop_arr(rec["image"], self._image_size), int(rec["label"])

    def __getitem__(self, index: int) -> dict:
        img, label = self.crop(index)
        return {"image": img.astype(np.float32) / 127.5 - 1.0, "label": np.int32(label)}

    def __repr__(self) -> str:
        name, split, size, n = self._desc
        return f"TfdsSource(name={name!r}, split={split!r}, image_size={size}, num_records={n})"


# ----------------------------------------------------------------------------- dispatch


def make_source(data_config, text_encoder_dir: str | None = None):
    """Builds the source named by `data_config.name`; digits_text encodes its captions with the
    encoder at `text_encoder_dir` (config.text.encoder_dir)."""
    name = _field(data_config, "name")
    if name == "digits":
        return DigitsSource()  # always 8x8: data.image_size only drives the tfds centre crop
    if name == "digits_text":
        return DigitsTextSource(text_encoder_dir)
    if name == "latents":
        return LatentSource(_field(data_config, "dir"))
    if name == "pixels":
        from switch_dit_jax.data.pixels import PixelSource  # pixels.py imports this module
        return PixelSource(_field(data_config, "dir"))
    if name == "tfds":
        tfds_name = _field(data_config, "tfds_name")
        if not tfds_name:
            raise ValueError("data.tfds_name is empty; set it to a TFDS dataset name such as "
                             "'imagenet2012'.")
        return TfdsSource(tfds_name, _field(data_config, "dir") or None,
                          _field(data_config, "split", "train"), _field(data_config, "image_size"))
    raise ValueError(f"data.name={name!r} is not a known dataset; choose one of {list(DATA_NAMES)}.")
