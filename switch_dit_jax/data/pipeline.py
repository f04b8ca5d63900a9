"""Training input pipeline: a checkpointable grain DataLoader per process, plus global batching.

Each process reads its own `1/process_count` slice of the source (grain ShardOptions), shuffled
with the seed, repeated forever, augmented per record, batched to `global // process_count`.
Augmentation randomness (flips, VAE posterior noise) comes from grain's per-record rng, which is
a pure function of (seed, position in the stream); so `iterator.get_state()` / `set_state()`
reproduce the exact same batches after a restart, and a record revisited in a later epoch gets
fresh noise and a fresh flip. Captioned records (COCO latents, digits_text) carry K captions;
the same rng draws one of them, so the caption a step sees is just as reproducible, and such
batches hold {"image", "text", "text_mask"} instead of a label.
"""
from __future__ import annotations

import jax
from absl import flags
import numpy as np

import grain.python as grain

from switch_dit_jax.data.sources import _field, make_source
from switch_dit_jax.errors import ConfigError


class AugmentTransform(grain.RandomMapTransform):
    """Per-record randomness: sample latents from the VAE posterior, scale, and maybe flip."""

    def __init__(self, seed: int, hflip: bool, latent_scale: float | None):
        self.seed = int(seed)
        self.hflip = bool(hflip)
        self.latent_scale = latent_scale

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        # grain keys its Philox rng on `seed + index`, so seeds s and s+1 would share streams
        # shifted by one record; jumping the counter by seed * 2**64 makes them disjoint (O(1)).
        rng.bit_generator.advance(self.seed << 64)
        if self.latent_scale is not None:
            eps = rng.standard_normal(element["mean"].shape, dtype=np.float32)
            image = (element["mean"] + element["std"] * eps) * np.float32(self.latent_scale)
        else:
            image = element["image"]
        # Draw the flip coin unconditionally so toggling hflip does not change the noise draws.
        flip = rng.random() < 0.5
        if self.hflip and flip:
            image = image[:, ::-1, :]
        image = np.ascontiguousarray(image, dtype=np.float32)
        if "captions" not in element:
            return {"image": image, "label": np.asarray(element["label"], dtype=np.int32)}
        # Drawn after the flip coin, so class and text data share the noise and flip streams.
        k = int(rng.integers(len(element["captions"])))
        return {"image": image, "text": np.asarray(element["captions"][k], np.float32),
                "text_mask": np.asarray(element["caption_mask"][k], bool)}


def _check_seed(seed) -> int:
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ConfigError(f"config.data.seed={seed!r} must be an integer in [0, 2**32) (grain's "
                          "limit).")
    return int(seed)


def make_train_loader(data_config, global_batch_size: int, process_index: int = 0,
                      process_count: int = 1, seed: int | None = None,
                      num_epochs: int | None = None, source=None,
                      text_encoder_dir: str | None = None) -> grain.DataLoader:
    """Returns a grain DataLoader yielding {"image": f32 [b,H,W,C], "label": i32 [b]} per process
    ({"image", "text": f32 [b,L,D], "text_mask": bool [b,L]} for captioned data).

    `b = global_batch_size // process_count`.  `seed` defaults to `data.seed`; `num_epochs=None`
    repeats forever.  `source` overrides `make_source(data_config)` (e.g. to reuse one);
    `text_encoder_dir` (config.text.encoder_dir) is the encoder of data.name="digits_text".
    The loader exposes the source as `loader.source` (for `image_shape` / `num_classes`).
    """
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size <= 0:
        raise ValueError(f"global_batch_size={global_batch_size!r} must be a positive integer.")
    if not isinstance(process_count, (int, np.integer)) or process_count <= 0:
        raise ValueError(f"process_count={process_count!r} must be a positive integer.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                         f"process_count={process_count}; pick a batch size that is a multiple of "
                         "the number of processes.")
    seed = _check_seed(_field(data_config, "seed", 0) if seed is None else seed)
    workers = _field(data_config, "num_workers", 0) or 0
    if not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ConfigError(f"config.data.num_workers={workers!r} must be an integer >= 0 (0 = "
                          "in-process).")

    if workers and not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; outside absl.app.run (pytest, notebooks)
        # nothing parses them, so fall back to the defaults instead of crashing in a worker.
        flags.FLAGS.mark_as_parsed()

    if source is None:
        source = make_source(data_config, text_encoder_dir)
    local_batch = global_batch_size // process_count
    shard_size = len(source) // process_count  # drop_remainder=True: equal shards
    if local_batch > shard_size:
        raise ConfigError(f"config.train.global_batch_size={global_batch_size} gives "
                          f"{local_batch} records per process, more than each process's shard "
                          f"({shard_size} of {len(source)} records over {process_count} "
                          "processes); lower the batch size.")

    is_latent = _field(data_config, "name") == "latents"
    latent_scale = None
    if is_latent:
        latent_scale = _field(data_config, "latent_scale", 0.18215)
        if not isinstance(latent_scale, (int, float)) or latent_scale <= 0:
            raise ValueError(f"data.latent_scale={latent_scale!r} must be a positive number "
                             "(0.18215 for the SD VAE).")
    shard = grain.ShardOptions(shard_index=int(process_index), shard_count=int(process_count),
                               drop_remainder=True)
    sampler = grain.IndexSampler(num_records=len(source), shard_options=shard, shuffle=True,
                                 num_epochs=num_epochs, seed=seed)
    ops = [AugmentTransform(seed, bool(_field(data_config, "hflip", False)), latent_scale),
           grain.Batch(batch_size=local_batch, drop_remainder=True)]
    # grain scans its whole prefetch buffer on every element, so the default of 500 costs more
    # than it saves for cheap records; two batches ahead keeps the read threads busy.
    read = grain.ReadOptions(num_threads=16, prefetch_buffer_size=max(32, min(2 * local_batch, 256)))
    loader = grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                              worker_count=int(workers), shard_options=shard, read_options=read)
    loader.source = source
    return loader


def global_batch(local_batch, sharding):
    """Assembles per-process numpy batches into global jax Arrays sharded along the batch dim."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
