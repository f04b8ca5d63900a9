"""Config validation before any work: each mistake is one sentence naming the field."""
from __future__ import annotations

import os

from switch_dit_jax import parallel
from switch_dit_jax.diffusion.gaussian import SCHEDULES
from switch_dit_jax.diffusion.weighting import WEIGHTINGS
from switch_dit_jax.models import resolve_model_config

OBJECTIVES = ("gaussian", "flow")
DATASETS = ("digits", "latents", "tfds")
SAMPLERS = {"gaussian": ("ddpm", "ddim"), "flow": ("euler", "heun", "dopri5")}


class ConfigError(ValueError):
    """A config value a user must change; the message names the field and the fix."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int(section, name: str, value, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
           f"config.{section}.{name}={value!r} must be an integer >= {low}.")


def parse_labels(text: str, num_classes: int) -> list[int]:
    """"1,2,3" -> [1, 2, 3] (config.sample.labels); each must be a class of the model."""
    if not str(text).strip():
        return []
    try:
        labels = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"config.sample.labels={text!r} must be comma-separated integers, "
                          "e.g. '1,7,207'.") from None
    bad = [v for v in labels if not 0 <= v < num_classes]
    _check(not bad, f"config.sample.labels has {bad[0] if bad else ''} outside [0, "
                    f"{num_classes}) (model.num_classes={num_classes}).")
    return labels


def validate_config(config, num_devices: int, process_count: int = 1) -> None:
    """Raise ConfigError for the first invalid field of `config`."""
    try:
        model = resolve_model_config(config.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    d = config.diffusion
    _check(d.objective in OBJECTIVES,
           f"config.diffusion.objective={d.objective!r}; use one of {list(OBJECTIVES)}.")
    _check(d.schedule in SCHEDULES,
           f"config.diffusion.schedule={d.schedule!r}; use one of {list(SCHEDULES)}.")
    _check(isinstance(d.num_timesteps, int) and d.num_timesteps >= 2,
           f"config.diffusion.num_timesteps={d.num_timesteps!r} must be an integer >= 2.")

    routing = model["routing"]
    if routing["kind"] != "none":
        _check(d.objective == "gaussian",
               f"config.model.routing.kind={routing['kind']!r} routes by discrete timestep and "
               "needs diffusion.objective='gaussian'.")
        _check(routing["num_tasks"] == d.num_timesteps,
               f"config.model.routing.num_tasks={routing['num_tasks']} must equal "
               f"diffusion.num_timesteps={d.num_timesteps} (one routing task per timestep).")

    loss = config.loss
    _check(loss.weighting in WEIGHTINGS,
           f"config.loss.weighting={loss.weighting!r}; use one of {list(WEIGHTINGS)}.")
    _check(loss.prior_weight >= 0 and loss.load_balance_weight >= 0,
           "config.loss.prior_weight and config.loss.load_balance_weight must be >= 0.")
    _check(d.objective == "gaussian" or loss.weighting == "constant",
           f"config.loss.weighting={loss.weighting!r} is defined for the Gaussian objective; "
           "use 'constant' with diffusion.objective='flow'.")
    if loss.weighting == "ant_uw":
        _positive_int("loss", "uw_clusters", loss.uw_clusters)
        _check(config.train.global_batch_size % loss.uw_clusters == 0,
               f"config.train.global_batch_size={config.train.global_batch_size} is not "
               f"divisible by config.loss.uw_clusters={loss.uw_clusters} (ANT-UW draws the "
               "same number of timesteps from every cluster).")

    data = config.data
    _check(data.name in DATASETS, f"config.data.name={data.name!r}; use one of {list(DATASETS)}.")
    if data.name in ("latents", "tfds"):
        _check(bool(data.dir), f"config.data.dir is empty but data.name={data.name!r} needs it; "
                               "pass --config.data.dir=/path/to/data.")
    if data.name == "digits":
        _check(model["input_size"] == 8 and model["in_channels"] == 1,
               f"the digits are 8x8x1 but config.model has input_size={model['input_size']}, "
               f"in_channels={model['in_channels']}; set model.input_size=8, "
               "model.in_channels=1.")
        _check(model["num_classes"] in (1, 10),
               f"the digits have 10 classes but config.model.num_classes="
               f"{model['num_classes']}; use 10 (or 1 for unconditional).")
    _positive_int("data", "num_workers", data.num_workers, allow_zero=True)

    t = config.train
    _positive_int("train", "global_batch_size", t.global_batch_size)
    _positive_int("train", "num_steps", t.num_steps, allow_zero=True)
    _positive_int("train", "warmup_steps", t.warmup_steps, allow_zero=True)
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        _positive_int("train", name, t[name])
    _positive_int("train", "sample_every", t.sample_every, allow_zero=True)
    _check(t.learning_rate > 0, f"config.train.learning_rate={t.learning_rate} must be > 0.")
    _check(0.0 <= t.ema_decay <= 1.0, f"config.train.ema_decay={t.ema_decay} must be in [0, 1].")
    _check(t.weight_decay >= 0, f"config.train.weight_decay={t.weight_decay} must be >= 0.")
    _check(t.grad_clip_norm >= 0,
           f"config.train.grad_clip_norm={t.grad_clip_norm} must be >= 0 (0 = no clipping).")

    s = config.sample
    samplers = SAMPLERS[d.objective]
    _check(s.sampler in samplers, f"config.sample.sampler={s.sampler!r} does not fit "
                                  f"diffusion.objective={d.objective!r}; use one of "
                                  f"{list(samplers)}.")
    _positive_int("sample", "num_samples", s.num_samples)
    _positive_int("sample", "batch_size", s.batch_size)
    _positive_int("sample", "num_steps", s.num_steps)
    _check(d.objective == "flow" or s.num_steps <= d.num_timesteps,
           f"config.sample.num_steps={s.num_steps} exceeds diffusion.num_timesteps="
           f"{d.num_timesteps}.")
    _check(s.cfg_scale >= 0, f"config.sample.cfg_scale={s.cfg_scale} must be >= 0 (1 = none).")
    parse_labels(s.labels, model["num_classes"])

    if "eval" in config and config.eval.eval_every:
        e = config.eval
        _positive_int("eval", "eval_every", e.eval_every)
        _positive_int("eval", "num_samples", e.num_samples)
        if data.name != "digits":
            for name in ("reference_npz", "inception_weights"):
                _check(bool(e[name]) and os.path.isfile(os.path.expanduser(e[name])),
                       f"config.eval.{name}={e[name]!r} is not a file, but eval.eval_every="
                       f"{e.eval_every} needs it for FID on {data.name!r} data; set it or set "
                       "eval.eval_every=0.")

    if "vae" in config:
        from switch_dit_jax import vae  # reads only the weights file's header
        try:
            vae.check_config(config)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None

    try:
        expert_devices = parallel.mesh_shape(config.mesh, num_devices)[2]
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    ffn = model["ffn"]
    _check(ffn["kind"] == "mlp" or ffn["num_experts"] % expert_devices == 0,
           f"config.mesh.expert={expert_devices} does not divide model.ffn.num_experts="
           f"{ffn['num_experts']}; experts are split evenly over the expert axis, so use a "
           "divisor of the number of experts.")
    _check(t.global_batch_size % num_devices == 0,
           f"config.train.global_batch_size={t.global_batch_size} is not divisible by the "
           f"{num_devices} devices the batch is split over; use a multiple of {num_devices}.")
    _check(t.global_batch_size % process_count == 0,
           f"config.train.global_batch_size={t.global_batch_size} is not divisible by the "
           f"{process_count} processes; use a multiple of {process_count}.")
