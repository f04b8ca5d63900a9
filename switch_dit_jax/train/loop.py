"""train_and_evaluate and sample_from_workdir: what `main` runs, for one host or many."""
from __future__ import annotations

import glob
import json
import logging
import os
import time

import flax.linen as nn
import jax
import numpy as np
from clu import parameter_overview

from switch_dit_jax import parallel, sample
from switch_dit_jax.data import pipeline
from switch_dit_jax.models import build_model
from switch_dit_jax.train import checkpoint as ckpt_lib
from switch_dit_jax.train import metrics as metrics_lib
from switch_dit_jax.train.preemption import PreemptionGuard
from switch_dit_jax.train.state import (count_params, create_train_state, make_optimizer,
                                        state_shardings)
from switch_dit_jax.train.step import make_diffusion, make_train_step
from switch_dit_jax.validation import ConfigError, validate_config

log = logging.getLogger("switch_dit_jax")


def _keys(seed: int):
    """(init key, per-step base key): one seed, two independent streams."""
    root = jax.random.PRNGKey(seed)
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def _check_data_matches_model(source, model) -> None:
    want = (model.input_size, model.input_size, model.in_channels)
    if tuple(source.image_shape) != want:
        raise ConfigError(f"the data yields {tuple(source.image_shape)} arrays but the model "
                          f"takes {want}; set model.input_size / model.in_channels to match "
                          "the data.")
    if model.num_classes > 1 and source.num_classes != model.num_classes:
        raise ConfigError(f"the data has {source.num_classes} classes but model.num_classes="
                          f"{model.num_classes}; set model.num_classes={source.num_classes} "
                          "(or 1 for unconditional).")


def evaluate_in_training(model, config, state, mesh, shardings, workdir: str, writer) -> dict:
    """eval.num_samples EMA samples -> the configured metrics (digits accuracy and FD on the
    digits; FID-N, sFID, IS, precision/recall against eval.reference_npz otherwise)."""
    from switch_dit_jax.eval import evaluate_samples
    step = int(state.step)
    images, labels = sample.generate(model, config, state.ema_params, state.ema_model_state,
                                     mesh, shardings.ema_params,
                                     num_samples=config.eval.num_samples)
    if config.data.name == "latents":
        images = sample.decode_latents(config, images, mesh)
        if images is None:
            log.warning("eval at step %d skipped: latent samples need config.vae.weights to "
                        "be decoded into images.", step)
            return {}
    e = config.eval
    result = evaluate_samples(sample.to_uint8(images), labels, data_name=config.data.name,
                              workdir=workdir, reference_npz=e.reference_npz or None,
                              inception_weights=e.inception_weights or None,
                              batch_size=e.batch_size, mesh=mesh)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
    return result


def write_samples(model, config, state, mesh, shardings, workdir: str, writer=None):
    """EMA samples -> samples/samples_<step>.png (grid) and .npz (ADM format, with labels)."""
    step = int(state.step)
    images, labels = sample.generate(model, config, state.ema_params, state.ema_model_state,
                                     mesh, shardings.ema_params)
    if config.data.name == "latents":
        latents, images = images, sample.decode_latents(config, images, mesh)
        if images is None:  # no VAE configured: keep the latents, there is no image to show
            return sample.save_latents(os.path.join(workdir, "samples", f"latents_{step:08d}.npz"),
                                       latents, labels)
    images = sample.to_uint8(images)
    grid = sample.image_grid(images, upscale=sample.grid_upscale(images.shape[1]))
    paths = {ext: os.path.join(workdir, "samples", f"samples_{step:08d}.{ext}")
             for ext in ("png", "npz")}
    if jax.process_index() == 0:
        sample.save_png(paths["png"], grid)
        sample.save_npz(paths["npz"], images, labels)
    if writer is not None:
        writer.write_images(step, {"ema_samples": grid[None]})
    return paths


def train_and_evaluate(config, workdir: str) -> None:
    validate_config(config, jax.device_count(), jax.process_count())
    mesh = parallel.make_mesh(config.mesh)
    model = build_model(config.model)
    diffusion = make_diffusion(config)
    tx = make_optimizer(config.train, config.loss)
    checkpointer = ckpt_lib.Checkpointer(workdir, config,
                                         max_to_keep=config.train.keep_checkpoints,
                                         async_save=config.train.async_checkpointing)
    resume_step = checkpointer.latest_step()
    # The loader of a resumed run continues the checkpoint's data stream, or starts a fresh one
    # when the process count changed (Checkpointer.resume_data_seed).
    data_seed = None if resume_step is None else checkpointer.resume_data_seed(resume_step)
    loader = pipeline.make_train_loader(config.data, config.train.global_batch_size,
                                        jax.process_index(), jax.process_count(), seed=data_seed)
    _check_data_matches_model(loader.source, model)

    abstract, shardings = state_shardings(model, tx, mesh, config.loss)
    data_iter = iter(loader)
    init_key, step_key = _keys(config.seed)
    if resume_step is not None:
        state = checkpointer.restore(abstract, shardings, data_iter, resume_step)
        log.info("resumed from the checkpoint of step %d in %s", int(state.step), workdir)
    else:
        state = create_train_state(model, tx, init_key, mesh, config.loss)
    if jax.process_index() == 0:
        log.info("parameters:\n%s", parameter_overview.get_parameter_overview(state.params))
        log.info("trainable parameters: %s", f"{count_params(state.params):,}")

    batch_sharding = parallel.batch_sharding(mesh)
    train_step = jax.jit(make_train_step(model, diffusion, tx, config),
                         in_shardings=(shardings, batch_sharding, parallel.replicated(mesh)),
                         out_shardings=(shardings, parallel.replicated(mesh)),
                         donate_argnums=(0,))
    writer = metrics_lib.make_writer(workdir, jax.process_index() == 0)
    t = config.train
    progress = metrics_lib.ProgressReporter(t.num_steps, writer, t.log_every)
    first = int(state.step)
    if first >= t.num_steps:
        log.info("the checkpoint is at step %d >= train.num_steps=%d: nothing to train.",
                 first, t.num_steps)
    history = []
    with PreemptionGuard() as guard, jax.set_mesh(mesh), \
            nn.logical_axis_rules(parallel.LOGICAL_RULES):
        for step in range(first + 1, t.num_steps + 1):
            batch = pipeline.global_batch(next(data_iter), batch_sharding)
            state, step_metrics = train_step(state, batch, step_key)
            history.append(step_metrics)
            if step % t.log_every == 0 or step == t.num_steps:
                means = jax.tree.map(lambda *m: float(np.mean(m)), *jax.device_get(history))
                writer.write_scalars(step, means)
                history = []
                progress(step)
            stopping = guard.should_stop(step)
            if step % t.checkpoint_every == 0 or step == t.num_steps or stopping:
                checkpointer.save(step, state, data_iter, force=stopping)
            if t.sample_every and (step % t.sample_every == 0 or step == t.num_steps):
                write_samples(model, config, state, mesh, shardings, workdir, writer)
            if config.eval.eval_every and step % config.eval.eval_every == 0:
                evaluate_in_training(model, config, state, mesh, shardings, workdir, writer)
            if stopping:
                log.info("SIGTERM: saved the checkpoint of step %d; exiting.", step)
                break
    checkpointer.wait()
    checkpointer.close()
    writer.flush()
    writer.close()


def restore_latest(config, workdir: str):
    """(model, mesh, state, shardings) of the latest checkpoint in `workdir`, opened read-only
    (sampling, evaluation and analysis of a run, possibly while it still trains)."""
    mesh = parallel.make_mesh(config.mesh)
    model = build_model(config.model)
    abstract, shardings = state_shardings(model, make_optimizer(config.train, config.loss), mesh,
                                          config.loss)
    with ckpt_lib.Checkpointer(workdir, config, max_to_keep=config.train.keep_checkpoints,
                               async_save=False, read_only=True) as checkpointer:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in --workdir={workdir}; train first "
                                    "(--mode=train) or point --workdir at a trained run.")
        state = checkpointer.restore(abstract, shardings, None)
    return model, mesh, state, shardings


def sample_from_workdir(config, workdir: str) -> dict[str, str]:
    """--mode=sample: EMA weights of the latest checkpoint -> PNG grid + ADM .npz."""
    validate_config(config, jax.device_count(), jax.process_count())
    model, mesh, state, shardings = restore_latest(config, workdir)
    start = time.time()
    paths = write_samples(model, config, state, mesh, shardings, workdir)
    log.info("sampled %d images in %.1fs: %s", config.sample.num_samples, time.time() - start,
             paths)
    return paths


def evaluate_workdir(config, workdir: str) -> dict[str, float]:
    """--mode=eval: metrics of the newest samples_<step>.npz in the workdir (digits: classifier
    accuracy and FD; other data: FID, sFID, IS, precision/recall vs eval.reference_npz)."""
    from switch_dit_jax.eval import evaluate_samples
    files = sorted(glob.glob(os.path.join(workdir, "samples", "samples_*.npz")))
    if not files:
        raise FileNotFoundError(f"no samples_*.npz in {workdir}/samples; run --mode=sample "
                                "first.")
    if config.data.name != "digits" and not (config.eval.reference_npz
                                             and config.eval.inception_weights):
        raise ConfigError("--mode=eval on non-digits data needs --config.eval.reference_npz "
                          "and --config.eval.inception_weights.")
    with np.load(files[-1]) as f:
        images, labels = f["arr_0"], f["arr_1"] if "arr_1" in f.files else None
    e = config.eval
    result = evaluate_samples(images, labels, data_name=config.data.name, workdir=workdir,
                              reference_npz=e.reference_npz or None,
                              inception_weights=e.inception_weights or None,
                              batch_size=e.batch_size)
    result = dict(result, num_samples=float(len(images)))
    out = files[-1][:-len(".npz")] + "_eval.json"
    if jax.process_index() == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(dict(result, samples=files[-1]), f, indent=1)
    log.info("evaluation of %s: %s", files[-1], result)
    return result
