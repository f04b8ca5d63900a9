"""Config validation before any work: each mistake is one sentence naming the field.

`config_fields.check_fields` checks each field alone (type, range, unknown names); this module
adds what relates fields to each other, to the devices (the mesh against every sharded
parameter dimension), to the files they name, and to the --workdir.
"""
from __future__ import annotations

import math
import os
import tempfile

from switch_dit_jax import config_fields, files, parallel
from switch_dit_jax.diffusion.gaussian import SCHEDULES
from switch_dit_jax.diffusion.weighting import WEIGHTINGS
from switch_dit_jax.errors import BadFileError, ConfigError
from switch_dit_jax.models import resolve_model_config

SAMPLERS = {"gaussian": ("ddpm", "ddim"), "flow": ("euler", "heun", "dopri5")}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


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
    config_fields.check_fields(config)
    try:
        model = resolve_model_config(config.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    is_dit = model["backbone"] == "dit"
    if is_dit:
        width = int(model["hidden_size"] * model["mlp_ratio"])
        _check(width >= 1, f"config.model.mlp_ratio={model['mlp_ratio']} gives an FFN width of "
                           f"{width} for model.hidden_size={model['hidden_size']}; use a ratio "
                           f"of at least {1 / model['hidden_size']:.3g} (DiT uses 4.0).")
    else:  # ADM's own label table has no null row unless label dropout trains one
        _check(model["num_classes"] == 1 or model["class_dropout_prob"] > 0
               or config.sample.cfg_scale == 1.0,
               f"config.sample.cfg_scale={config.sample.cfg_scale} needs the null class of "
               "classifier-free guidance, which the ADM UNet has only with "
               "model.class_dropout_prob > 0; set sample.cfg_scale=1.0 (e.g. for an imported "
               "OpenAI checkpoint) or train with label dropout.")
    ffn = model["ffn"]
    d = config.diffusion
    _check(d.schedule in SCHEDULES,
           f"config.diffusion.schedule={d.schedule!r}; use one of {list(SCHEDULES)}.")

    t_range = tuple(d.get("t_range", (0, 0)))
    if t_range != (0, 0):
        _check(d.objective == "gaussian" and config.loss.weighting != "ant_uw",
               f"config.diffusion.t_range={t_range} restricts the discrete training timesteps; "
               "it needs diffusion.objective='gaussian' and a loss.weighting other than "
               "'ant_uw' (which draws from every cluster).")
        _check(t_range[1] <= d.num_timesteps,
               f"config.diffusion.t_range={t_range} ends past diffusion.num_timesteps="
               f"{d.num_timesteps}; use an interval inside [0, {d.num_timesteps}).")

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
    _check(d.objective == "gaussian" or loss.weighting == "constant",
           f"config.loss.weighting={loss.weighting!r} is defined for the Gaussian objective; "
           "use 'constant' with diffusion.objective='flow'.")
    if loss.weighting == "ant_uw":
        _check(loss.uw_clusters <= d.num_timesteps,
               f"config.loss.uw_clusters={loss.uw_clusters} exceeds diffusion.num_timesteps="
               f"{d.num_timesteps}; every cluster needs at least one timestep.")
        _check(config.train.global_batch_size % loss.uw_clusters == 0,
               f"config.train.global_batch_size={config.train.global_batch_size} is not "
               f"divisible by config.loss.uw_clusters={loss.uw_clusters} (ANT-UW draws the "
               "same number of timesteps from every cluster).")

    data = config.data
    if data.name in ("latents", "tfds", "pixels"):
        _check(bool(data.dir), f"config.data.dir is empty but data.name={data.name!r} needs it; "
                               "pass --config.data.dir=/path/to/data.")
    if data.name == "digits_text":
        _check(bool(config.text.encoder_dir),
               "config.text.encoder_dir is empty but data.name='digits_text' encodes its "
               "captions with it; write a tiny CLIP with `python -m switch_dit_jax.text.tiny "
               "--out=DIR` and pass --config.text.encoder_dir=DIR.")
    if data.name in ("digits", "digits_text"):
        _check(model["input_size"] == 8 and model["in_channels"] == 1,
               f"the digits are 8x8x1 but config.model has input_size={model['input_size']}, "
               f"in_channels={model['in_channels']}; set model.input_size=8, "
               "model.in_channels=1.")
    text_model = model.get("conditioning") == "text"
    _check(not text_model or data.name in ("digits_text", "latents"),
           f"config.model.conditioning='text' needs captioned data, but data.name="
           f"{data.name!r} has none; use 'digits_text' or latents extracted with --source=coco.")
    _check(text_model or data.name != "digits_text",
           "data.name='digits_text' yields captions; set config.model.conditioning='text' (and "
           "model.text_width / text_length to the text encoder's) to train on them.")
    if data.name == "digits":  # digits_text conditions on captions, not on the class table
        _check(model["num_classes"] in (1, 10),
               f"the digits have 10 classes but config.model.num_classes="
               f"{model['num_classes']}; use 10 (or 1 for unconditional).")

    t = config.train
    from switch_dit_jax.train.runtime import parse_profile_steps
    try:
        parse_profile_steps(t.get("profile_steps", ""))
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None  # runtime names it train.profile_steps

    init_from = t.get("init_from", "")
    _check(not init_from or os.path.exists(os.path.expanduser(init_from)),
           f"config.train.init_from={init_from!r} does not exist; pass a workdir or checkpoint "
           "step directory of this project, or an official .npz / .safetensors file.")
    if t.get("wandb_project") and t.get("wandb_mode") != "disabled":
        import importlib.util
        _check(importlib.util.find_spec("wandb") is not None,
               f"config.train.wandb_project={t.wandb_project!r} needs the wandb package, which "
               "is not installed; pip install wandb, or set train.wandb_project=''.")

    s = config.sample
    samplers = SAMPLERS[d.objective]
    _check(s.sampler in samplers, f"config.sample.sampler={s.sampler!r} does not fit "
                                  f"diffusion.objective={d.objective!r}; use one of "
                                  f"{list(samplers)}.")
    _check(d.objective == "flow" or s.num_steps <= d.num_timesteps,
           f"config.sample.num_steps={s.num_steps} exceeds diffusion.num_timesteps="
           f"{d.num_timesteps}.")
    parse_labels(s.labels, model["num_classes"])
    if text_model:
        for name in ("prompts", "captions_file"):
            path = os.path.expanduser(s.get(name, ""))
            _check(not path or os.path.isfile(path),
                   f"config.sample.{name}={s.get(name)!r} is not a file; give "
                   + ("a text file with one prompt per line." if name == "prompts" else
                      "the val_captions.npz written by `python -m switch_dit_jax.data.coco`."))
        _check(bool(s.get("prompts") or s.get("captions_file")) or not (
            t.sample_every or ("eval" in config and config.eval.eval_every)),
               "a text model samples from prompts: set config.sample.prompts (a text file, one "
               "prompt per line) or config.sample.captions_file, or set train.sample_every=0 "
               "and eval.eval_every=0.")
        _check(not s.get("prompts") or bool(config.text.encoder_dir),
               "config.sample.prompts are encoded by the text encoder: set "
               "config.text.encoder_dir to its CLIP directory.")
    _check(s.get("cfg_channels", 0) <= model["in_channels"],
           f"config.sample.cfg_channels={s.get('cfg_channels')} exceeds the "
           f"{model['in_channels']} channels of the model input (model.in_channels); use 0 "
           "(all) or a number up to it.")

    if "eval" in config and config.eval.eval_every:
        e = config.eval
        if data.name not in ("digits", "digits_text"):
            for name in ("reference_npz", "inception_weights"):
                path = os.path.expanduser(e[name])
                _check(bool(e[name]) and os.path.isfile(path),
                       f"config.eval.{name}={e[name]!r} is not a file, but eval.eval_every="
                       f"{e.eval_every} needs it for FID on {data.name!r} data; set it or set "
                       "eval.eval_every=0.")
                try:
                    files.NpzFile(path, f"config.eval.{name}").close()  # the zip directory
                except BadFileError as err:
                    raise ConfigError(str(err)) from None

    if "vae" in config:
        from switch_dit_jax import vae  # reads only the weights file's header
        try:
            vae.check_config(config)
        except (BadFileError, FileNotFoundError) as e:
            raise ConfigError(f"config.vae.weights: {e}") from None
        except ValueError as e:
            raise ConfigError(str(e)) from None

    try:
        sizes = parallel.mesh_shape(config.mesh, num_devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    expert_devices = sizes[2]
    _check(ffn["kind"] == "mlp" or ffn["num_experts"] % expert_devices == 0,
           f"config.mesh.expert={expert_devices} does not divide model.ffn.num_experts="
           f"{ffn['num_experts']}; experts are split evenly over the expert axis, so use a "
           "divisor of the number of experts.")
    _check(t.global_batch_size % num_devices == 0,
           f"config.train.global_batch_size={t.global_batch_size} is not divisible by the "
           f"{num_devices} devices the batch is split over; use a multiple of {num_devices}.")
    accum = t.get("grad_accum_steps", 1)
    _check(t.global_batch_size % (accum * num_devices) == 0,
           f"config.train.global_batch_size={t.global_batch_size} does not split into "
           f"train.grad_accum_steps={accum} micro-batches shared evenly by the {num_devices} "
           f"devices; use a multiple of {accum * num_devices} (or fewer accumulation steps).")
    _check(loss.weighting != "ant_uw"
           or (t.global_batch_size // loss.uw_clusters) % accum == 0,
           f"config.train.grad_accum_steps={accum} must divide the "
           f"{t.global_batch_size // loss.uw_clusters} samples ANT-UW draws per cluster "
           f"(global_batch_size / loss.uw_clusters), so that every micro-batch holds every "
           "cluster equally.")
    _check(t.global_batch_size % process_count == 0,
           f"config.train.global_batch_size={t.global_batch_size} is not divisible by the "
           f"{process_count} processes; use a multiple of {process_count}.")
    _check(not is_dit or ffn["kind"] == "mlp" or ffn["first"] < model["depth"],
           f"config.model.ffn.first={ffn['first']} is not a block of the model.depth="
           f"{model['depth']} blocks, so no block would get a {ffn['kind']!r} mixture; use a "
           f"value in [0, {model['depth']}).")
    check_parameter_sharding(config, sizes)


def check_parameter_sharding(config, sizes) -> None:
    """Every parameter dimension with a sharded logical axis must divide by its mesh axes.

    Works on shapes only (`jax.eval_shape` of the initialisation), so even DiT-XL costs no
    memory; skipped when no mesh axis that shards parameters is larger than 1.
    """
    sizes = dict(zip(parallel.MESH_AXES, sizes))
    if all(sizes[a] == 1 for a in ("fsdp", "expert")):
        return
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from switch_dit_jax.models import build_model, example_condition

    model = build_model(config.model)
    s = model.input_size
    boxed = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, s, s, model.in_channels)),
                                                jnp.zeros((1,)), example_condition(model)),
                           jax.random.PRNGKey(0))
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    for path, leaf in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0]:
        if not is_box(leaf):
            continue
        spec = nn.logical_to_mesh_axes(leaf.names, parallel.LOGICAL_RULES)
        for dim, (size, axes) in enumerate(zip(leaf.value.shape, spec)):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            split = math.prod(sizes[a] for a in axes)
            if size % split:
                name = "/".join(str(getattr(k, "key", k)) for k in path[1:])
                field = " x ".join(f"config.mesh.{a}={sizes[a]}" for a in axes)
                raise ConfigError(
                    f"{field} does not divide dimension {dim} (size {size}, logical axis "
                    f"{leaf.names[dim]!r}) of parameter {name} {tuple(leaf.value.shape)}; "
                    f"use a mesh size that divides {size}.")


def check_workdir(workdir: str, create: bool = True) -> str:
    """The absolute --workdir, after making sure it is (or can become) a writable directory.

    `create=False` (sampling, evaluation: they read a trained run) leaves a missing directory
    to the caller, which names what it looked for.
    """
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir={workdir} is a file, not a directory; pass a directory "
                          "(a missing one is created).")
    if not os.path.exists(path):
        if not create:
            return path
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--workdir={workdir} cannot be created ({e.strerror or e}); pass "
                              "a directory this user can create or write to.") from None
    try:  # os.access is not enough: it says yes on read-only mounts and to root
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as e:
        raise ConfigError(f"--workdir={workdir} is not writable ({e.strerror or e}); pass a "
                          "directory this user can write to.") from None
    return path
