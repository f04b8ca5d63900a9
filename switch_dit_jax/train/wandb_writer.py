"""Weights & Biases logging (train.wandb_project): a run's config, scalars and images.

wandb is optional: this module is imported only when train.wandb_project is set (validation
names the missing package otherwise). `train.wandb_mode`: "online" (needs a login or
WANDB_API_KEY), "offline" (everything under `<workdir>/wandb/`, uploaded later with
`wandb sync <workdir>/wandb/offline-run-*`) or "disabled" (no W&B at all).

One workdir is one W&B run: the first start writes its id to `<workdir>/wandb_run_id` and every
restart continues that run (wandb.init(id=..., resume="allow")). A run resumed from a
checkpoint at step s repeats steps s+1.. exactly (README "Reliability"), and W&B keeps one
value per step: rows at steps it already has are not sent again.
"""
from __future__ import annotations

import os
import secrets
from typing import Mapping

import numpy as np

RUN_ID_FILE = "wandb_run_id"


def run_id(workdir: str) -> str:
    """This workdir's W&B run id: read from RUN_ID_FILE, or made and written there once."""
    path = os.path.join(workdir, RUN_ID_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    new = secrets.token_hex(4)  # W&B run ids: letters and digits, unique in the project
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new + "\n")
    os.replace(tmp, path)  # a crash leaves no half-written id
    return new


class WandbWriter:
    """The writer interface of train/metrics.py over one wandb run."""

    def __init__(self, workdir: str, config):
        import wandb
        self._wandb = wandb
        t = config.train
        self._run = wandb.init(project=t.wandb_project, mode=t.wandb_mode, dir=workdir,
                               id=run_id(workdir), resume="allow",
                               name=os.path.basename(os.path.normpath(workdir)),
                               config=config.to_dict(),
                               # the training log stays the process's own stdout
                               settings=wandb.Settings(console="off"))

    def _log(self, step: int, row: dict) -> None:
        if int(step) < self._run.step:  # a resumed run repeating steps W&B already has
            return
        self._run.log(row, step=int(step))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._log(step, {k: float(v) for k, v in scalars.items()})

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Each value: [N, H, W, C] uint8; N > 1 becomes a list of images."""
        row = {}
        for name, batch in images.items():
            batch = np.asarray(batch)
            batch = batch[..., 0] if batch.shape[-1] == 1 else batch  # grey: [N, H, W]
            shown = [self._wandb.Image(image) for image in batch]
            row[name] = shown[0] if len(shown) == 1 else shown
        if row:
            self._log(step, row)

    def flush(self) -> None:
        pass  # wandb sends rows from its own service process

    def close(self) -> None:
        self._run.finish()
