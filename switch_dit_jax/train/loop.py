"""train_and_evaluate and sample_from_workdir: what `main` runs, for one host or many."""
from __future__ import annotations

import glob
import json
import logging
import os
import time

import flax.linen as nn
import jax
from clu import parameter_overview

from switch_dit_jax import cpu_tuning, parallel, sample
from switch_dit_jax.analysis import figures
from switch_dit_jax.data import pipeline
from switch_dit_jax.data.captions import load_empty_caption, prompt_digits
from switch_dit_jax.errors import BadFileError
from switch_dit_jax.files import load_npz
from switch_dit_jax.models import build_model, flops
from switch_dit_jax.train import checkpoint as ckpt_lib
from switch_dit_jax.train import guard as guard_lib
from switch_dit_jax.train import metrics as metrics_lib
from switch_dit_jax.train import peers, pictures, runtime, warm_start, workdir_lock
from switch_dit_jax.train.preemption import PreemptionGuard, StartupStop
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
    if sample.is_text_model(model):
        text_shape = getattr(source, "text_shape", None)
        if text_shape is None:
            raise ConfigError(f"model.conditioning='text' but the data ({source!r}) has no "
                              "captions; use data.name='digits_text' or latents extracted with "
                              "--source=coco.")
        want = (model.text_length, model.text_width)
        if tuple(text_shape[-2:]) != want:
            raise ConfigError(f"the data's captions are {tuple(text_shape[-2:])} text states "
                              f"but the model takes {want}; set model.text_length / "
                              f"model.text_width to {tuple(text_shape[-2:])}.")
        return
    if getattr(source, "text_shape", None) is not None:
        raise ConfigError("the data holds captions but model.conditioning='class'; set "
                          "model.conditioning='text' to train on them.")
    if model.num_classes > 1 and source.num_classes != model.num_classes:
        raise ConfigError(f"the data has {source.num_classes} classes but model.num_classes="
                          f"{model.num_classes}; set model.num_classes={source.num_classes} "
                          "(or 1 for unconditional).")


def _eval_data(config, labels):
    """(data name, labels) for the evaluator: a digits_text run's prompts become the digits
    they name, so the digits classifier checks that each sample shows its prompt's digit."""
    if config.data.name == "digits_text":
        return "digits", prompt_digits(labels)
    return config.data.name, labels


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
    data_name, labels = _eval_data(config, labels)
    result = evaluate_samples(sample.to_uint8(images), labels, data_name=data_name,
                              workdir=workdir, reference_npz=e.reference_npz or None,
                              inception_weights=e.inception_weights or None,
                              batch_size=e.batch_size, mesh=mesh)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
    return result


def write_samples(model, config, state, mesh, shardings, workdir: str, writer=None):
    """EMA samples -> samples/samples_<step>.png (grid) and .npz (ADM format, with labels);
    with a writer, the grid and the routing / capacity pictures (train/pictures.py) go to it."""
    step = int(state.step)
    recorder = pictures.capacity_recorder(model) if writer is not None else None
    images, labels = sample.generate(model, config, state.ema_params, state.ema_model_state,
                                     mesh, shardings.ema_params, on_capacity=recorder)
    if writer is not None:  # routing / capacity pictures of the models that have them
        writer.write_images(step, pictures.training_pictures(model, config, state.ema_params,
                                                             workdir, recorder))
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
        if sample.is_text_model(model):
            count = min(len(images), 32)
            figures.captioned_grid(images[:count], labels[:count],
                                   figures.run_title("samples from prompts",
                                                     figures.run_name(workdir), step),
                                   paths["png"])
        else:
            sample.save_png(paths["png"], grid)
        sample.save_npz(paths["npz"], images, labels)
    if writer is not None:
        writer.write_images(step, {"ema_samples": grid[None]})
    return paths


def train_and_evaluate(config, workdir: str) -> None:
    """Trains `config` in `workdir`, resuming from its newest intact checkpoint.

    Reliability (README "Reliability"): one trainer per workdir (`train.lock`); checkpoints that
    fail validation are moved to `checkpoints/corrupt/` and the next older one is used; a
    non-finite step is handled by train.nonfinite and a non-finite state is never saved; a
    failed background save stops the run at once; metrics.jsonl is cut back to the restored
    step; SIGTERM at any point ends the run with exit status 0 and a line on what was saved;
    in a multi-process run a lost peer ends every survivor at once, saving nothing.
    """
    with PreemptionGuard() as guard:  # from the first moment: start-up SIGTERM included
        try:
            validate_config(config, jax.device_count(), jax.process_count())
            with workdir_lock.hold(workdir) as lock:
                release = lock.release if lock is not None else None
                if release:
                    peers.on_exit(release)
                try:
                    _train(config, workdir, guard, lock)
                finally:
                    if release:
                        peers.forget(release)
        except StartupStop as e:
            log.info("%s", e)
        except BaseException as e:
            peers.exit_if_lost(e, workdir)
            raise


def _train_flops_and_peak(model, config) -> tuple[float | None, float | None]:
    """(analytic FLOPs of one train step, peak FLOP/s of all devices) for the MFU of the
    progress line; (None, None) off the devices of flops.PEAK_FLOPS (e.g. on a CPU)."""
    peak = flops.peak_flops(jax.devices()[0].device_kind, config.model.compute_dtype)
    if peak is None:
        return None, None
    return (flops.train_flops_per_step(model, config.train.global_batch_size),
            peak * jax.device_count())


def _latest_text(checkpointer) -> str | None:
    """The newest checkpoint as "N in DIR" (None: none yet), once pending saves are done."""
    try:
        checkpointer.wait()
    except ckpt_lib.CheckpointSaveError:
        pass  # reported by whoever saw it first; the latest step is still what is on disk
    latest = checkpointer.latest_step()
    return None if latest is None else f"{latest} in {checkpointer.directory}"


def _nothing_saved(checkpointer) -> str:
    latest = _latest_text(checkpointer)
    return ("nothing was saved (the latest checkpoint, step " + latest + ", is unchanged)."
            if latest else "nothing was saved (there is no checkpoint yet).")


def _save(checkpointer, lock, nonfinite, step, state, data_iter, force) -> str:
    """One checkpoint save under the reliability rules; returns what happened: "saved",
    "skipped" (not due, or already there) or "nonfinite" (refused, under skip/warn)."""
    workdir_lock.check_still_held(lock, step)
    try:
        return "saved" if checkpointer.save(step, state, data_iter, force=force) else "skipped"
    except guard_lib.NonFiniteStateError as e:
        what = f"the train state's {', '.join(e.parts)} hold NaN or inf"
        if nonfinite.policy == "stop":
            raise guard_lib.NonFiniteError(nonfinite.stop_message(step, what)) from None
        latest = _latest_text(checkpointer)
        log.warning("not saving the checkpoint of step %d: %s (train.nonfinite=%r); %s.", step,
                    what, nonfinite.policy, f"the latest checkpoint stays step {latest}"
                    if latest else "there is no checkpoint yet")
        return "nonfinite"


def _train(config, workdir: str, guard, lock) -> None:
    mesh = parallel.make_mesh(config.mesh)
    model = build_model(config.model, remat_policy=config.train.remat_policy)
    diffusion = make_diffusion(config)
    tx = make_optimizer(config.train, config.loss)
    runtime.enable_compilation_cache(config.train.compilation_cache, workdir)
    profiler = runtime.StepProfiler(runtime.parse_profile_steps(config.train.profile_steps),
                                    os.path.join(workdir, "profile"))
    checkpointer = ckpt_lib.Checkpointer(workdir, config,
                                         max_to_keep=config.train.keep_checkpoints,
                                         async_save=config.train.async_checkpointing)
    writer = None
    try:
        guard.raise_if_received(lambda: _nothing_saved(checkpointer))
        abstract, shardings = state_shardings(model, tx, mesh, config.loss)
        found = checkpointer.restore_newest_intact(abstract, shardings, move_corrupt=True)
        resume_step, state = found if found else (None, None)
        # The loader of a resumed run continues the checkpoint's data stream, or starts a fresh
        # one when the process count changed (Checkpointer.resume_data_seed).
        data_seed = None if resume_step is None else checkpointer.resume_data_seed(resume_step)
        loader = pipeline.make_train_loader(config.data, config.train.global_batch_size,
                                            jax.process_index(), jax.process_count(),
                                            seed=data_seed,
                                            text_encoder_dir=config.text.encoder_dir)
        _check_data_matches_model(loader.source, model)
        data_iter = iter(loader)
        init_key, step_key = _keys(config.seed)
        if resume_step is not None:
            checkpointer.restore_data(resume_step, data_iter)
            log.info("resumed from the checkpoint of step %d in %s%s", int(state.step), workdir,
                     f" (train.init_from={config.train.init_from!r} applies to new runs only)"
                     if config.train.get("init_from") else "")
        else:
            state = create_train_state(model, tx, init_key, mesh, config.loss)
            if config.train.get("init_from"):
                state = warm_start.warm_start(state, config, shardings)
        if jax.process_index() == 0:
            log.info("parameters:\n%s", parameter_overview.get_parameter_overview(state.params))
            log.info("trainable parameters: %s", f"{count_params(state.params):,}")

        batch_sharding = parallel.batch_sharding(mesh)
        null_condition = None
        if sample.is_text_model(model):  # the empty caption: caption dropout's null condition
            text, mask = load_empty_caption(config)
            null_condition = {"text": text, "text_mask": mask}
        train_step = cpu_tuning.lazily_compiled(jax.jit(
            make_train_step(model, diffusion, tx, config, null_condition),
            in_shardings=(shardings, batch_sharding, parallel.replicated(mesh)),
            out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,)))
        t = config.train
        first = int(state.step)
        if jax.process_index() == 0:  # the steps after `first` are written again below
            metrics_lib.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), first)
        writer = metrics_lib.make_writer(workdir, jax.process_index() == 0, first, config)
        progress = metrics_lib.ProgressReporter(t.num_steps, writer, t.log_every,
                                                t.global_batch_size,
                                                *_train_flops_and_peak(model, config))
        nonfinite = guard_lib.NonFiniteGuard(t.get("nonfinite", "stop"),
                                             lambda: _latest_text(checkpointer))
        if first >= t.num_steps:
            log.info("the checkpoint is at step %d >= train.num_steps=%d: nothing to train.",
                     first, t.num_steps)
        guard.raise_if_received(lambda: _nothing_saved(checkpointer))
        history, stopped = [], None
        with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
            for step in range(first + 1, t.num_steps + 1):
                batch = pipeline.global_batch(next(data_iter), batch_sharding)
                profiler.before(step)
                state, step_metrics = train_step(state, batch, step_key)
                profiler.after(step, step_metrics)
                nonfinite.record(step, step_metrics)
                history.append(step_metrics)
                checkpointer.raise_if_save_failed()  # at once, not at the next save
                stopping = guard.should_stop(step)
                log_due = step % t.log_every == 0 or step == t.num_steps
                save_due = step % t.checkpoint_every == 0 or step == t.num_steps or stopping
                sample_due = bool(t.sample_every) and (step % t.sample_every == 0
                                                       or step == t.num_steps)
                eval_due = bool(config.eval.eval_every) and step % config.eval.eval_every == 0
                if log_due:
                    means = metrics_lib.window_means(jax.device_get(history))
                    writer.write_scalars(step, means)
                    history = []
                    progress(step, means.get("loss"))
                if log_due or save_due or sample_due or eval_due:
                    nonfinite.check()  # train.nonfinite="stop" raises here, before any save
                saved = (_save(checkpointer, lock, nonfinite, step, state, data_iter, stopping)
                         if save_due else "skipped")
                if sample_due:
                    write_samples(model, config, state, mesh, shardings, workdir, writer)
                if eval_due:
                    evaluate_in_training(model, config, state, mesh, shardings, workdir, writer)
                if stopping:
                    stopped = (step, saved)
                    break
        profiler.stop()
        checkpointer.wait()  # a failed last save is a CheckpointSaveError here
        if stopped:
            step, saved = stopped
            if saved == "saved":
                log.info("SIGTERM: saved the checkpoint of step %d in %s; exiting.", step,
                         checkpointer.directory)
            else:
                log.info("SIGTERM at step %d: %s", step,
                         "its checkpoint was already saved; exiting." if saved == "skipped"
                         else _nothing_saved(checkpointer))
        elif guard.received:
            log.info("SIGTERM after the last step: the run is complete; the latest checkpoint "
                     "is step %s.", _latest_text(checkpointer))
    except BaseException as e:
        peers.exit_if_lost(e, workdir)  # before the clean-up below, which would wait for it
        _close_quietly(checkpointer, writer)
        raise
    checkpointer.close()
    writer.flush()
    writer.close()


def _close_quietly(checkpointer, writer) -> None:
    """Clean-up on an error: commit what is pending, without hiding the error itself."""
    for close in (checkpointer.close, getattr(writer, "close", None)):
        if close is None:
            continue
        try:
            close()
        except Exception as e:  # pylint: disable=broad-except
            log.warning("while stopping: %s: %s", type(e).__name__, " ".join(str(e).split()))


def restore_latest(config, workdir: str):
    """(model, mesh, state, shardings) of the newest intact checkpoint in `workdir`, opened
    read-only (sampling, evaluation and analysis of a run, possibly while it still trains).
    Broken checkpoints are skipped with a log line, never moved (see
    Checkpointer.restore_newest_intact)."""
    mesh = parallel.make_mesh(config.mesh)
    model = build_model(config.model)
    abstract, shardings = state_shardings(model, make_optimizer(config.train, config.loss), mesh,
                                          config.loss)
    with ckpt_lib.Checkpointer(workdir, config, max_to_keep=config.train.keep_checkpoints,
                               async_save=False, read_only=True) as checkpointer:
        found = checkpointer.restore_newest_intact(abstract, shardings, move_corrupt=False)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in --workdir={workdir}; train first "
                                "(--mode=train) or point --workdir at a trained run.")
    return model, mesh, found[1], shardings


def sample_from_workdir(config, workdir: str) -> dict[str, str]:
    """--mode=sample: EMA weights of the latest checkpoint -> PNG grid + ADM .npz."""
    validate_config(config, jax.device_count(), jax.process_count())
    runtime.enable_compilation_cache(config.train.compilation_cache, workdir)
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
    if config.data.name not in ("digits", "digits_text") and not (config.eval.reference_npz
                                             and config.eval.inception_weights):
        raise ConfigError("--mode=eval on non-digits data needs --config.eval.reference_npz "
                          "and --config.eval.inception_weights.")
    arrays = load_npz(files[-1], "samples file", keys=("arr_0", "arr_1", "prompts"))
    if "arr_0" not in arrays:
        raise BadFileError(f"samples file {files[-1]!r} has no 'arr_0' images; write it again "
                           "with --mode=sample.")
    images, labels = arrays["arr_0"], arrays.get("arr_1", arrays.get("prompts"))
    e = config.eval
    data_name, labels = _eval_data(config, labels)
    result = evaluate_samples(images, labels, data_name=data_name, workdir=workdir,
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
