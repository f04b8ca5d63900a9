"""TensorBoard event files without TensorFlow, W&B offline runs, the progress line."""
import glob
import json
import logging
import os
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import test_train
import test_warm_start
from switch_dit_jax import parallel
from switch_dit_jax.models import build_model
from switch_dit_jax.train import loop
from switch_dit_jax.train.state import make_optimizer, state_shardings
from switch_dit_jax.train import metrics as metrics_lib
from wandb_records import records


def read_events(logdir):
    """TensorBoard's own reader, which applies the purge of a resumed run's events."""
    acc = event_accumulator.EventAccumulator(
        logdir, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
    acc.Reload()
    return acc


def test_event_files_hold_scalars_and_images_and_a_resume_shows_each_step_once(tmp_path):
    logdir = str(tmp_path / "tensorboard")
    first = metrics_lib.TensorBoardWriter(logdir, first=0)
    for step in range(1, 7):
        first.write_scalars(step, {"loss": step})
    first.write_images(6, {"ema_samples": np.full((1, 5, 7, 1), 200, np.uint8)})
    first.close()
    resumed = metrics_lib.TensorBoardWriter(logdir, first=3)  # restored the step-3 checkpoint
    for step in range(4, 7):
        resumed.write_scalars(step, {"loss": 10 * step})
    resumed.write_images(5, {"ema_samples": np.zeros((2, 4, 4, 3), np.uint8)})
    resumed.close()
    assert "tensorflow" not in sys.modules
    assert len(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))) == 2
    acc = read_events(logdir)
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]  # each step once
    assert [e.value for e in loss] == [1, 2, 3, 40, 50, 60]  # after step 3: the resumed run's
    images = acc.Images("ema_samples")
    assert [e.step for e in images] == [5]  # the first run's step-6 image was purged
    assert images[0].height == 4 and images[0].width == 8  # two 4x4 images in one grid


def test_progress_line_reports_images_per_second_and_mfu(monkeypatch, caplog):
    clock = iter([100.0, 110.0, 120.0, 140.0])
    monkeypatch.setattr(metrics_lib.time, "monotonic", lambda: next(clock))
    rows = []
    writer = type("W", (), {"write_scalars": lambda self, s, v: rows.append((s, v))})()
    flops_per_step, peak = 3e14, 8 * 989e12  # e.g. 8 H200 in bfloat16
    with caplog.at_level(logging.INFO, logger="switch_dit_jax"):
        on_gpu = metrics_lib.ProgressReporter(1000, writer, 100, 256, flops_per_step, peak)
        on_gpu(100)  # starts the clock
        on_gpu(200, loss=0.125)  # 100 steps in 10 s
        on_cpu = metrics_lib.ProgressReporter(1000, writer, 100, 256)  # no peak: no MFU
        on_cpu(100)
        on_cpu(200)  # 100 steps in 20 s
    assert rows == [(200, {"steps_per_sec": 10.0, "images_per_sec": 2560.0,
                           "mfu": pytest.approx(10 * 3e14 / (8 * 989e12))}),
                    (200, {"steps_per_sec": 5.0, "images_per_sec": 1280.0})]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 200")]
    assert lines == ["step 200/1000: 10.00 steps/s, 2560.0 images/s, MFU 37.9%, loss 0.125, "
                     "ETA 00:01:20", "step 200/1000: 5.00 steps/s, 1280.0 images/s, ETA 00:02:40"]


def wandb_runs(workdir):
    """{offline run directory: (config, {step: history row}, media files)} of a workdir."""
    out = {}
    for run_dir in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))):
        config, rows = {}, {}
        for record in records(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0]):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in record.history.item}
                rows.setdefault(row["_step"], {}).update(row)
        out[run_dir] = (config, rows, glob.glob(os.path.join(run_dir, "files", "media", "**",
                                                             "*.png"), recursive=True))
    return out


def test_a_switch_run_logs_to_tensorboard_and_wandb_offline_and_resumes_both(tmp_path, caplog,
                                                                             monkeypatch):
    workdir, weights = str(tmp_path / "run"), str(tmp_path / "dit.npz")
    overrides = {"model.routing.kind": "switch", "diffusion.num_timesteps": 100,
                 "model.routing.num_tasks": 100, "train.sample_every": 3,
                 "train.grad_accum_steps": 2, "train.wandb_project": "workbench-test",
                 "train.wandb_mode": "offline", "train.loss_buckets": 4,
                 "train.init_from": weights}  # official DiT weights into Switch-DiT
    config = test_train.tiny_config(**overrides)
    model = build_model(config.model)
    abstract, _ = state_shardings(model, make_optimizer(config.train), parallel.make_mesh(
        config.mesh))
    np.savez(weights, **test_warm_start.official_state_dict(abstract.params))
    monkeypatch.setenv("WANDB_SILENT", "true")
    with caplog.at_level(logging.INFO, logger="switch_dit_jax"):
        loop.train_and_evaluate(test_train.tiny_config(**overrides, **{"train.num_steps": 3}),
                                workdir)
        # resumes at 3; samples (and their pictures) only in the first run, to save compiles
        loop.train_and_evaluate(test_train.tiny_config(**dict(
            overrides, **{"train.sample_every": 0})), workdir)
    log = [r.getMessage() for r in caplog.records]
    assert any("images/s" in line for line in log)
    assert sum(f"warm start from the official weights {weights}" in line for line in log) == 1
    assert any("applies to new runs only" in line for line in log)  # the resumed second run

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    buckets = {k for r in rows for k in r if k.startswith("loss/t_bucket_")}
    assert buckets and buckets <= {f"loss/t_bucket_{k}" for k in range(4)}

    acc = read_events(os.path.join(workdir, "tensorboard"))
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    assert {"ema_samples", "routing/gate_vs_prior", "routing/denoising_paths"} <= set(
        acc.Tags()["images"])
    assert [e.step for e in acc.Images("routing/gate_vs_prior")] == [3]
    assert os.path.exists(os.path.join(workdir, "analysis", "gate_vs_prior.png"))

    runs = wandb_runs(workdir)
    run_id = open(os.path.join(workdir, "wandb_run_id")).read().strip()
    assert len(runs) == 2 and all(d.endswith("-" + run_id) for d in runs)  # the same run
    (config, first_rows, media), (_, second_rows, _) = runs.values()
    assert config["train"]["grad_accum_steps"] == 2 and config["model"]["routing"]["kind"] == (
        "switch")
    assert sorted(s for s, r in first_rows.items() if "loss" in r) == [1, 2, 3]
    assert sorted(s for s, r in second_rows.items() if "loss" in r) == [4, 5, 6]
    assert first_rows[3]["ema_samples/_type"] == "image-file"
    assert "routing/gate_vs_prior/_type" in first_rows[3] and len(media) == 3
