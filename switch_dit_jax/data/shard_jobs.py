"""Shard jobs: the resumable, multi-process writing that `extract.py` and `pixels.py` share.

Shard i holds items [i·shard_size, (i+1)·shard_size); process p of P writes shards p, p+P, ...
with no communication, so hosts never wait for each other and each resumes on its own. A shard
is written under `.tmp` and renamed when complete: a rerun skips the complete ones and redoes a
partial one. `manifest.json` holds the settings; a rerun with other settings is refused before
anything is written, and whichever process ends with every shard present counts the records
into the final manifest.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

log = logging.getLogger("switch_dit_jax")

MANIFEST = "manifest.json"


def shard_name(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}.array_record"


class RecordShard:
    """Byte records into one ArrayRecord shard, visible under its name only after `close()`.

    As a context manager, an exception inside the block discards the partial shard."""

    def __init__(self, path: str):
        from array_record.python.array_record_module import ArrayRecordWriter
        self.path, self._tmp_path = path, path + ".tmp"
        # group_size:1 keeps every record independently addressable, which random access needs.
        self._writer = ArrayRecordWriter(self._tmp_path, "group_size:1")
        self.num_records = 0

    def write(self, record: bytes) -> None:
        self._writer.write(record)
        self.num_records += 1

    def close(self) -> str:
        self._writer.close()
        os.replace(self._tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        self._writer.close()
        if os.path.exists(self._tmp_path):
            os.remove(self._tmp_path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def init_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
    """jax.distributed from the flags, or from SLURM / TPU / JAX_COORDINATOR_ADDRESS."""
    import jax
    env = os.environ
    if coordinator_address or num_processes:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", "") \
            or env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()


def check_positive(**values) -> None:
    for flag, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"--{flag}={value!r} must be a positive integer.")


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """Which shards of `num_items` items this process writes, and where."""
    out_dir: str
    prefix: str
    num_items: int
    shard_size: int
    process_index: int
    process_count: int

    @classmethod
    def create(cls, out_dir, prefix, num_items, shard_size, process_index=None,
               process_count=None) -> "ShardJob":
        """`process_index` / `process_count` default to jax's (1 of 1 without distributed)."""
        if process_index is None or process_count is None:
            import jax
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        pi, pc = int(process_index), int(process_count)
        if not 0 <= pi < pc:
            raise ValueError(f"process_index={pi} must be in [0, process_count={pc}).")
        return cls(out_dir, prefix, num_items, shard_size, pi, pc)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_items / self.shard_size)

    @property
    def tag(self) -> str:
        return f"[process {self.process_index}/{self.process_count}]"

    def path(self, shard: int) -> str:
        return os.path.join(self.out_dir, shard_name(self.prefix, shard, self.num_shards))

    def items(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_items))

    def mine(self) -> list[int]:
        return list(range(self.process_index, self.num_shards, self.process_count))


def write_json(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"  # per-process name: several hosts may write the same file
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def check_resume(out_dir: str, manifest: dict, keys, what: str) -> None:
    """Refuses to add to shards of `out_dir` written with other values of `keys`."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    for key in keys:  # .get: a key absent from both (latents without text) agrees
        if old.get(key) != manifest.get(key):
            raise ValueError(f"--out_dir={out_dir!r} holds {what} made with other settings "
                             f"({key}: {old.get(key)!r} then, {manifest.get(key)!r} now); use "
                             "a new --out_dir or repeat the original settings to resume.")


def start(job: ShardJob, manifest: dict, resume_keys, what: str) -> None:
    """Checks a resume against `manifest.json`; process 0 writes it on a fresh start."""
    os.makedirs(job.out_dir, exist_ok=True)
    check_resume(job.out_dir, manifest, resume_keys, what)
    path = os.path.join(job.out_dir, MANIFEST)
    if job.process_index == 0 and not os.path.exists(path):
        write_json(path, manifest)


class Progress:
    """Items done of this process's shards, logged at most every `every_s` seconds."""

    def __init__(self, tag: str, done: int, total: int, every_s: float):
        self.tag, self.done, self.total, self.every_s = tag, done, total, every_s
        self.encoded = self.skipped = 0
        self.start = self.last = time.time()

    def add(self, images: int) -> None:
        self.encoded += images
        if time.time() - self.last > self.every_s:
            self.report()

    def report(self) -> None:
        self.last = time.time()
        done = self.done + self.encoded
        rate = self.encoded / max(self.last - self.start, 1e-9)
        eta = (self.total - done) / rate if rate else float("nan")
        log.info("%s %d/%d images (%.1f%%), %.1f images/s, ETA %.0f s", self.tag, done,
                 self.total, 100.0 * done / max(self.total, 1), rate, eta)


def run(job: ShardJob, write_shard, log_every_s: float, verb: str = "writing",
        detail: str = "") -> Progress:
    """Calls `write_shard(shard, items, progress)` -> writer (its `.path`, `.num_records`) for
    every shard of this process not yet complete; returns the progress."""
    mine = job.mine()
    todo = [s for s in mine if not os.path.exists(job.path(s))]
    total = sum(len(job.items(s)) for s in mine)
    done = total - sum(len(job.items(s)) for s in todo)
    log.info("%s %d of my %d shards already complete; %s %d images in %d shards%s", job.tag,
             len(mine) - len(todo), len(mine), verb, total - done, len(todo), detail)
    progress = Progress(job.tag, done, total, log_every_s)
    for shard in todo:
        writer = write_shard(shard, job.items(shard), progress)
        log.info("%s wrote %s (%d records)", job.tag, os.path.basename(writer.path),
                 writer.num_records)
    progress.report()
    if progress.skipped:
        log.warning("%s skipped %d unreadable images (listed above)", job.tag, progress.skipped)
    return progress


def count_records(paths: list[str]) -> int:
    from array_record.python.array_record_module import ArrayRecordReader
    total = 0
    for p in paths:  # one at a time: ImageNet has more shards than the open-file limit
        reader = ArrayRecordReader(p)
        total += reader.num_records()
        reader.close()
    return total


def finish(job: ShardJob, manifest: dict, records_per_image: int, what: str) -> dict:
    """Counts records once every shard exists (whichever process gets there writes it);
    returns the manifest, `complete` once counted."""
    import jax
    if jax.process_count() > 1:  # jax.distributed: process 0 counts once all have written
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"{what} finished")
        if jax.process_index() != 0:
            return manifest
    paths = [job.path(s) for s in range(job.num_shards)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        log.info("[process %d] done; %d shard(s) of other processes still missing: the last "
                 "process to end completes manifest.json", job.process_index, len(missing))
        return manifest
    records = count_records(paths)
    images = records // records_per_image
    manifest = dict(manifest, complete=True, num_records=records, num_images=images,
                    num_skipped=manifest["num_source_images"] - images)
    write_json(os.path.join(job.out_dir, MANIFEST), manifest)
    log.info("%s complete: %d records (%d images, %d skipped) in %d shards in %s", what,
             records, images, manifest["num_skipped"], job.num_shards, job.out_dir)
    return manifest
