"""Latent extraction: images (TFDS or a folder) -> SD-VAE posterior ArrayRecord shards.

    python -m switch_dit_jax.data.extract --source=folder --image_dir=/data/imagenet/train \
        --vae=/weights/sd-vae-ft-ema/diffusion_pytorch_model.safetensors \
        --out_dir=/data/imagenet256_latents

Every image gets the ADM centre crop to --image_size and is encoded twice, as itself and as its
horizontal flip: two records `(mean, std, label)` in the format of `sources.LatentShardWriter`.
Training samples `mean + std·ε` afresh at every read, so neither the VAE noise nor the flip is
frozen; train on these shards with `data.hflip=False` (the flips are already in the data).

Shard i holds images [i·shard_size, (i+1)·shard_size); process p of P writes shards p, p+P, ...
and encodes on its own local devices, so hosts never wait for each other and each resumes on
its own: a finished shard (renamed from `.tmp` on close) is skipped on restart, a partial one
is redone (`shard_jobs.py`, shared with `pixels.py`). `manifest.json` records the VAE (path,
sha256, architecture), crop, sizes, label map and, once every shard exists, the record counts.

`--source=coco` reads MS-COCO images with their caption JSON (`--annotations`) and adds to both
records of an image the `--text_encoder` (CLIP) embeddings of its first five captions by
annotation id (repeated cyclically when it has fewer; images without any are skipped and
counted), float16, in the caption block of `captions.py`; `empty_caption.npz` beside the shards
holds the encoding of "" (the null condition of classifier-free guidance).
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from switch_dit_jax import vae as vae_lib
from switch_dit_jax.data import captions as captions_lib
from switch_dit_jax.data import shard_jobs
from switch_dit_jax.data.images import CROP, make_reader
from switch_dit_jax.data.sources import LatentShardWriter

log = logging.getLogger("switch_dit_jax")

PREFIX = "latents"
SOURCES = ("folder", "tfds", "coco")
ON_ERROR = ("fail", "skip")
# Settings that decide what the shards contain; a resumed run must repeat them exactly.
_RESUME_KEYS = ("source", "num_source_images", "vae_sha256", "vae_architecture", "image_size",
                "shard_size", "num_shards", "label_map", "conditioning", "text_width",
                "text_length", "captions_per_image", "text_encoder_sha256")


class ImageReadError(RuntimeError):
    """An image that could not be read or decoded, with --on_error=fail."""


def _loaded_batches(reader, indices, batch_size: int, pool):
    """Yields (indices, futures) per batch, keeping two batches of reads ahead of the encoder."""
    pending = collections.deque()
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        pending.append((chunk, [pool.submit(reader.load, i) for i in chunk]))
        if len(pending) > 2:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


@functools.lru_cache(maxsize=4)
def _jit_encoder(model, devices: tuple):
    """The encoder over this process's devices, batch-split; cached so reruns skip compiling."""
    mesh = Mesh(np.asarray(devices), ("batch",))
    batch, rep = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"),
                 in_shardings=(rep, batch), out_shardings=(batch, batch))
    return fn, rep


def _make_encoder(model, params, devices):
    """x -> (mean, std) as device arrays, not yet fetched."""
    fn, rep = _jit_encoder(model, tuple(devices))
    placed = jax.device_put(params, rep)
    return lambda x: fn(placed, x)


def extract(*, vae: str, out_dir: str, source: str = "folder", image_dir: str | None = None,
            labels: str = "auto", tfds_name: str | None = None, data_dir: str | None = None,
            split: str = "train", image_size: int = 256, batch_size: int = 32,
            shard_size: int = 1000, num_workers: int = 8, on_error: str = "fail",
            latent_scale: float = 0.18215, limit: int = 0,
            vae_block_out_channels=vae_lib.SD_BLOCK_OUT_CHANNELS, vae_layers_per_block: int = 2,
            vae_norm_num_groups: int = 32, vae_latent_channels: int = 4,
            process_index: int | None = None, process_count: int | None = None,
            log_every_s: float = 30.0, annotations: str | None = None,
            text_encoder: str | None = None, captions_per_image: int = 5,
            encoder=None) -> dict:
    """Encodes this process's shards into `out_dir`; returns the manifest (see module doc).

    `encoder` (coco) overrides loading `text_encoder`: any object with `.encode(texts)`,
    `.width` and `.max_length`."""
    if source not in SOURCES:
        raise ValueError(f"--source={source!r} is not one of {list(SOURCES)}.")
    if on_error not in ON_ERROR:
        raise ValueError(f"--on_error={on_error!r} is not one of {list(ON_ERROR)}.")
    shard_jobs.check_positive(batch_size=batch_size, shard_size=shard_size,
                              image_size=image_size)
    if not out_dir:
        raise ValueError("--out_dir is empty; pass the directory to write the latent shards to.")
    model, params = vae_lib.load_vae(vae, vae_block_out_channels, vae_layers_per_block,
                                     vae_norm_num_groups, vae_latent_channels)
    factor = model.downsample_factor
    if image_size % factor:
        nearest = max(factor, image_size // factor * factor)
        raise ValueError(f"--image_size={image_size} is not a multiple of {factor}, the VAE's "
                         f"downsampling factor; use e.g. {nearest}.")
    if source == "coco":
        from switch_dit_jax.data.coco import CocoReader
        reader = CocoReader(image_dir, annotations, image_size, captions_per_image)
        encoder = encoder or captions_lib.load_encoder(text_encoder, "--text_encoder")
    else:
        reader = make_reader(source, image_dir=image_dir, labels=labels, tfds_name=tfds_name,
                             data_dir=data_dir, split=split, image_size=image_size)
    n = min(len(reader), limit) if limit else len(reader)
    job = shard_jobs.ShardJob.create(out_dir, PREFIX, n, shard_size, process_index,
                                     process_count)
    num_shards = job.num_shards
    latent = image_size // factor
    manifest = {
        "format": "SDL1 ArrayRecord latent shards (switch_dit_jax.data.sources)",
        "source": reader.description, "num_source_images": n,
        "vae_file": os.path.abspath(vae), "vae_sha256": vae_lib.sha256_file(vae),
        "vae_architecture": {"block_out_channels": list(model.block_out_channels),
                             "layers_per_block": model.layers_per_block,
                             "norm_num_groups": model.norm_num_groups,
                             "latent_channels": model.latent_channels},
        "crop": CROP, "image_size": image_size,
        "latent_shape": [latent, latent, model.latent_channels],
        "records": "two per image: the image, then its horizontal flip "
                   "(train with data.hflip=False)",
        "stored": "unscaled posterior mean and std; training samples mean + std * eps",
        "latent_scale": latent_scale, "shard_size": shard_size, "num_shards": num_shards,
        "shard_prefix": PREFIX, "num_classes": reader.num_classes, "label_map": reader.label_map,
        "complete": False,
    }
    if source == "coco":
        manifest.update(reader.text_manifest(encoder, text_encoder))
    shard_jobs.start(job, manifest, _RESUME_KEYS, "latents")
    caption_fn = None
    if source == "coco":
        captions_lib.write_empty_caption(out_dir, encoder)
        caption_fn = functools.partial(reader.encode_captions, encoder)

    devices = jax.local_devices()
    # Image and flip share a batch; padding to the device count keeps one compiled shape.
    padded = math.ceil(2 * batch_size / len(devices)) * len(devices)
    encode = _make_encoder(model, params, devices)
    shape = (padded, image_size, image_size, 3)

    def write_shard(shard, indices, progress):
        with LatentShardWriter(out_dir, shard, num_shards, PREFIX, reader.num_classes) as writer:
            _encode_shard(writer, reader, list(indices), encode, shape, batch_size, pool,
                          on_error, progress, caption_fn)
        return writer

    pool = concurrent.futures.ThreadPoolExecutor(max(1, num_workers))
    try:
        shard_jobs.run(job, write_shard, log_every_s, "encoding", f" on {len(devices)} devices")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return shard_jobs.finish(job, manifest, 2, "latent extraction")


def _encode_shard(writer, reader, indices, encode, shape, batch_size, pool, on_error,
                  progress, caption_fn=None) -> None:
    """Encodes `indices` (and their flips) into `writer`, image i then its flip; `caption_fn`
    maps the kept indices to their caption embeddings, which both records carry."""
    def flush(pending):
        if pending is not None:
            (mean, std), labels, text = jax.device_get(pending[0]), pending[1], pending[2]
            b = len(labels)
            for j in range(b):
                caps = (text[0][j], text[1][j]) if text is not None else (None, None)
                writer.write(mean[j], std[j], labels[j], *caps)
                writer.write(mean[b + j], std[b + j], labels[j], *caps)

    pending = None
    for chunk, futures in _loaded_batches(reader, indices, batch_size, pool):
        images, labels, kept = [], [], []
        for index, future in zip(chunk, futures):
            try:
                image, label = future.result()
            except Exception as e:  # noqa: BLE001 -- whatever the decoder raised, it is the file's
                if on_error == "fail":
                    raise ImageReadError(f"cannot read image {reader.name(index)} ({e}); fix or "
                                         "remove it, or pass --on_error=skip to skip unreadable "
                                         "images.") from e
                log.warning("%s skipping unreadable image %s: %s", progress.tag,
                            reader.name(index), e)
                progress.skipped += 1
                continue
            images.append(image)
            labels.append(label)
            kept.append(index)
        if images:
            b = len(images)
            x = np.zeros(shape, np.float32)
            x[:b] = np.stack(images).astype(np.float32) / 127.5 - 1.0
            x[b:2 * b] = x[:b, :, ::-1]
            # Dispatch is asynchronous: the device encodes this batch while the host writes the
            # previous one and waits for the next reads.
            text = caption_fn(kept) if caption_fn is not None else None
            current = (encode(x), labels, text)
            flush(pending)
            pending = current
        progress.add(len(chunk))
    flush(pending)


def _define_flags():
    from absl import flags as f
    f.DEFINE_enum("source", "folder", list(SOURCES), "Where the images come from.")
    f.DEFINE_string("image_dir", None, "--source=folder: the image folder (e.g. ImageNet train/).")
    f.DEFINE_enum("labels", "auto", ["auto", "subfolders", "none"], "--source=folder: labels "
                  "from sorted class subfolders, or none (one class: FFHQ); auto: by the layout.")
    f.DEFINE_string("tfds_name", "imagenet2012", "--source=tfds: the TFDS dataset name.")
    f.DEFINE_string("data_dir", None, "--source=tfds: the TFDS data_dir with the prepared dataset.")
    f.DEFINE_string("split", "train", "--source=tfds: the split.")
    f.DEFINE_string("annotations", None, "--source=coco: captions_train2014.json (or 2017).")
    f.DEFINE_string("text_encoder", None, "--source=coco: the Hugging Face CLIP directory.")
    f.DEFINE_integer("captions_per_image", 5, "--source=coco: captions stored per image.")
    f.DEFINE_string("vae", None, "The VAE's diffusion_pytorch_model.safetensors (diffusers).")
    f.DEFINE_list("vae_block_out_channels", list(map(str, vae_lib.SD_BLOCK_OUT_CHANNELS)),
                  "VAE widths (SD: 128,256,512,512).")
    f.DEFINE_integer("vae_layers_per_block", 2, "VAE resnets per encoder block (SD: 2).")
    f.DEFINE_integer("vae_norm_num_groups", 32, "VAE GroupNorm groups (SD: 32).")
    f.DEFINE_integer("vae_latent_channels", 4, "VAE latent channels (SD: 4).")
    f.DEFINE_string("out_dir", None, "Directory for the shards and manifest.json.")
    f.DEFINE_integer("image_size", 256, "ADM centre-crop size (a multiple of 8).")
    f.DEFINE_integer("batch_size", 32, "Images per encoder step per process (each also flipped).")
    f.DEFINE_integer("shard_size", 1000, "Images per shard (2 records each).")
    f.DEFINE_integer("num_workers", 8, "Threads that read and crop images.")
    f.DEFINE_enum("on_error", "fail", list(ON_ERROR), "An unreadable image: stop, or skip it.")
    f.DEFINE_float("latent_scale", 0.18215,
                   "Recorded in the manifest (training's data.latent_scale).")
    f.DEFINE_integer("limit", 0, "Encode only the first N images (0 = all).")
    f.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
    f.DEFINE_integer("num_processes", None, "Processes of a multi-host run.")
    f.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
    return f.FLAGS


def _main(argv) -> None:
    import sys
    del argv
    flags_ = FLAGS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if not flags_.vae or not flags_.out_dir:
        sys.exit("error: pass --vae=/path/diffusion_pytorch_model.safetensors and --out_dir=DIR.")
    shard_jobs.init_distributed(flags_.coordinator_address, flags_.num_processes,
                                flags_.process_id)
    names = ("vae", "out_dir", "source", "image_dir", "labels", "tfds_name", "data_dir", "split",
             "image_size", "batch_size", "shard_size", "num_workers", "on_error", "latent_scale",
             "limit", "vae_layers_per_block", "vae_norm_num_groups", "vae_latent_channels",
             "annotations", "text_encoder", "captions_per_image")
    try:
        extract(**{k: getattr(flags_, k) for k in names},
                vae_block_out_channels=tuple(int(w) for w in flags_.vae_block_out_channels))
    except (ValueError, FileNotFoundError, ImageReadError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    from absl import app
    FLAGS = _define_flags()
    app.run(_main)
