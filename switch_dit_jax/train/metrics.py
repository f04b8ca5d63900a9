"""Metric writers and the progress line, all without TensorFlow.

Every chief process writes `<workdir>/metrics.jsonl` (one JSON row per log step) and the log,
TensorBoard event files in `<workdir>/tensorboard` (tensorboardX: no TensorFlow needed; view
with `tensorboard --logdir <workdir>`), and, with train.wandb_project set, a Weights & Biases
run (train/wandb_writer.py). PNG images are also written to `<workdir>/samples/` by the caller.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Mapping

import numpy as np

log = logging.getLogger("switch_dit_jax")


# Per-timestep-bucket sums and counts of the per-sample loss: [K] arrays among a step's
# metrics (train/step.py), turned into `loss/t_bucket_{k}` over a log window by window_means.
BUCKET_SUMS, BUCKET_COUNTS = "t_buckets/loss_sum", "t_buckets/count"


class JsonlWriter:
    """Scalars as JSON lines ({"step": s, name: value, ...}) plus a log line; images as a log
    line only (they are saved as PNGs next to the JSONL)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = {k: float(v) for k, v in scalars.items()}
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()
        log.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in values.items()))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        log.info("[%d] images: %s", step, ", ".join(f"{k} {v.shape}" for k, v in images.items()))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MultiWriter:
    def __init__(self, writers):
        self._writers = list(writers)

    def write_scalars(self, step, scalars):
        for w in self._writers:
            w.write_scalars(step, scalars)

    def write_images(self, step, images):
        for w in self._writers:
            w.write_images(step, images)

    def flush(self):
        for w in self._writers:
            w.flush()

    def close(self):
        for w in self._writers:
            w.close()


class NullWriter:
    def write_scalars(self, step, scalars):
        pass

    def write_images(self, step, images):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def truncate_jsonl(path: str, last_step: int) -> int:
    """Drops the rows of `path` after `last_step` (and a last line cut short by a crash), so a
    run resumed at `last_step` writes each later step once. Returns how many rows went.

    The file is rewritten to a temporary name and renamed, so a crash leaves the old or the new
    file, never a mix.
    """
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                step = int(json.loads(line).get("step", 0))
            except (ValueError, TypeError, AttributeError):
                dropped += 1
                continue
            if step <= last_step:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)
        log.info("%s: dropped %d row(s) after step %d, which this run writes again.", path,
                 dropped, last_step)
    return dropped


class TensorBoardWriter:
    """Scalars and images as TensorBoard event files (tensorboardX).

    A run that starts at step `first` (0, or the restored checkpoint's step) opens a new events
    file whose first event is a session start at `first + 1`: TensorBoard's reader then drops
    every older event at steps > `first` (tensorboardX's purge_step), so a resumed run shows
    each step once, with the value this run wrote, as metrics.jsonl does.
    """

    def __init__(self, logdir: str, first: int):
        from tensorboardX import SummaryWriter
        # The suffix keeps two runs started within the same second in separate files, in order.
        self._writer = SummaryWriter(logdir, purge_step=first + 1, flush_secs=30,
                                     filename_suffix=f".from_step_{first:09d}")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), int(step))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Each value: [N, H, W, C] uint8 (C = 1, 3 or 4), shown as one grid."""
        for name, value in images.items():
            self._writer.add_images(name, np.asarray(value), int(step), dataformats="NHWC")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def make_writer(workdir: str, is_chief: bool, first: int = 0, config=None):
    """Only the chief process writes: JSONL + TensorBoard from step `first` on, and W&B when
    `config.train.wandb_project` is set (and wandb_mode is not "disabled")."""
    if not is_chief:
        return NullWriter()
    writers = [JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
               TensorBoardWriter(os.path.join(workdir, "tensorboard"), first)]
    t = config.train if config is not None else {}
    if t.get("wandb_project") and t.get("wandb_mode", "online") != "disabled":
        from switch_dit_jax.train.wandb_writer import WandbWriter
        writers.append(WandbWriter(workdir, config))
    return MultiWriter(writers)


def window_means(history: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """The per-step metrics of one log window -> the values written for it: each metric's mean
    over the steps, and `loss/t_bucket_{k}` = the mean per-sample loss of all the window's
    samples whose t fell in bucket k (a bucket without samples is left out of the row)."""
    from switch_dit_jax.train.guard import FINITE
    rows = [dict(m) for m in history]
    sums = [r.pop(BUCKET_SUMS, None) for r in rows]
    counts = [r.pop(BUCKET_COUNTS, None) for r in rows]
    means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != FINITE}
    if sums[0] is not None:
        total, count = np.sum(sums, axis=0), np.sum(counts, axis=0)
        means.update({f"loss/t_bucket_{k}": float(total[k] / count[k])
                      for k in range(len(total)) if count[k] > 0})
    return means


class ProgressReporter:
    """The progress line every `every_steps`: steps/s, images/s, MFU (on a device of
    flops.PEAK_FLOPS: `flops_per_step` / time over `peak_flops`, the peak of all devices), the
    last loss and the ETA; steps/s, images/s and MFU also go to the writer."""

    def __init__(self, num_train_steps: int, writer, every_steps: int, batch_size: int,
                 flops_per_step: float | None = None, peak_flops: float | None = None):
        self._total, self._every, self._writer = num_train_steps, every_steps, writer
        self._batch = batch_size
        self._flops = flops_per_step if peak_flops else None
        self._peak = peak_flops
        self._last_step, self._last_time = None, None

    def __call__(self, step: int, loss: float | None = None) -> None:
        now = time.monotonic()
        if self._last_step is None:  # the first call only starts the clock (after compiling)
            self._last_step, self._last_time = step, now
            return
        if step - self._last_step < self._every:
            return
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        eta = (self._total - step) / max(rate, 1e-9)
        scalars = {"steps_per_sec": rate, "images_per_sec": rate * self._batch}
        parts = [f"{rate:.2f} steps/s", f"{rate * self._batch:.1f} images/s"]
        if self._flops is not None:
            scalars["mfu"] = rate * self._flops / self._peak
            parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        self._writer.write_scalars(step, scalars)
        log.info("step %d/%d: %s, ETA %s", step, self._total, ", ".join(parts),
                 time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400
                 else f"{eta / 86400:.1f} days")
        self._last_step, self._last_time = step, now
