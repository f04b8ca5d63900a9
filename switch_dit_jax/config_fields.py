"""The type and range of every field of `config_base.get_base_config()`, checked one by one.

`check_fields(config)` raises a ConfigError for the first unknown field (with the nearest known
name) or the first value of the wrong type or out of range. Checks that relate several fields,
or that need the devices, the model or files, live in `validation.py`. This module imports no
JAX, so `main` can run it before anything touches the devices.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Callable

from switch_dit_jax.errors import ConfigError

Rule = tuple[str, Callable[[Any], bool]]  # (what the value must be, the test)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))


def integer(low: int = 0, high: int | None = None) -> Rule:
    if high is None:
        return f"an integer >= {low}", lambda v: _is_int(v) and v >= low
    return f"an integer in [{low}, {high})", lambda v: _is_int(v) and low <= v < high


def number(gt=None, ge=None, lt=None, le=None) -> Rule:
    """A finite int or float with the given open (gt, lt) or closed (ge, le) bounds."""
    lo, hi = (gt if gt is not None else ge), (lt if lt is not None else le)
    if lo is not None and hi is not None:
        desc = (f"a number in {'(' if gt is not None else '['}{lo}, {hi}"
                f"{')' if lt is not None else ']'}")
    elif lo is not None:
        desc = f"a number {'>' if gt is not None else '>='} {lo}"
    else:
        desc = f"a number {'<' if lt is not None else '<='} {hi}"

    def ok(v):
        return (_is_number(v) and (gt is None or v > gt) and (ge is None or v >= ge)
                and (lt is None or v < lt) and (le is None or v <= le))
    return desc, ok


def choice(*values) -> Rule:
    return f"one of {list(values)}", lambda v: isinstance(v, type(values[0])) and v in values


def optional(rule: Rule) -> Rule:
    desc, ok = rule
    return f"{desc} or None", lambda v: v is None or ok(v)


BOOLEAN: Rule = ("True or False", lambda v: isinstance(v, bool))
TEXT: Rule = ("a string", lambda v: isinstance(v, str))
# grain and NumPy take seeds in [0, 2**32); jax.random.PRNGKey takes them too.
SEED: Rule = ("an integer in [0, 2**32)", lambda v: _is_int(v) and 0 <= v < 2**32)
POSITIVE = integer(1)
COUNT = integer(0)
FRACTION = number(ge=0, le=1)
MESH_SIZE: Rule = ("-1 (the devices left over) or an integer >= 1",
                   lambda v: _is_int(v) and (v == -1 or v >= 1))
INTERVAL: Rule = ("a pair (lo, hi) of integers with 0 <= lo < hi, or (0, 0)",
                  lambda v: isinstance(v, (tuple, list)) and len(v) == 2
                  and all(_is_int(i) for i in v) and (tuple(v) == (0, 0) or 0 <= v[0] < v[1]))
STAGES: Rule = ("() or a pair (stage I, stage II) of training steps with 0 <= I < II",
                lambda v: isinstance(v, (tuple, list)) and (len(v) == 0 or (
                    len(v) == 2 and all(_is_int(i) for i in v) and 0 <= v[0] < v[1])))
MULTIPLIERS: Rule = ("a tuple of positive numbers (empty = the default)",
                    lambda v: isinstance(v, (tuple, list))
                    and all(_is_number(m) and m > 0 for m in v))
SIZES: Rule = ("a tuple of integers >= 1",
               lambda v: isinstance(v, (tuple, list)) and all(_is_int(s) and s >= 1 for s in v))
WIDTHS: Rule = ("a non-empty tuple of integers >= 1",
                lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                and all(_is_int(w) and w >= 1 for w in v))

# Every leaf of the base config. Choices defined by another module (model names, schedules,
# weightings, mixture kinds, samplers) are checked by `validation.py` against that module.
FIELD_RULES: dict[str, Rule] = {
    "seed": SEED,
    "model.backbone": choice("dit", "adm"),
    "model.name": TEXT,
    "model.depth": optional(POSITIVE),
    "model.hidden_size": optional(POSITIVE),
    "model.num_heads": optional(POSITIVE),
    "model.patch_size": optional(POSITIVE),
    "model.head_dim": optional(POSITIVE),
    "model.input_size": POSITIVE,
    "model.in_channels": POSITIVE,
    "model.num_classes": POSITIVE,
    "model.class_dropout_prob": number(ge=0, lt=1),
    "model.conditioning": choice("class", "text"),
    "model.text_width": POSITIVE,
    "model.text_length": POSITIVE,
    "model.caption_dropout_prob": number(ge=0, lt=1),
    "model.learn_sigma": BOOLEAN,
    "model.mlp_ratio": number(gt=0),
    "model.compute_dtype": TEXT,
    "model.attention_impl": optional(choice("auto", "xla", "cudnn")),
    "model.routing.kind": TEXT,
    "model.routing.num_tasks": integer(2),
    "model.routing.alpha": number(gt=0),
    "model.routing.beta": number(gt=0, le=1),
    "model.routing.seed": SEED,
    "model.routing.clusters": POSITIVE,
    "model.routing.roaming_period": POSITIVE,
    "model.routing.roaming_sample_step": integer(-1),
    "model.routing.num_experts": POSITIVE,
    "model.routing.top_k": POSITIVE,
    "model.routing.integration": TEXT,
    "model.routing.noisy_gating": BOOLEAN,
    "model.routing.allocation": TEXT,
    "model.ffn.kind": TEXT,
    "model.ffn.num_experts": POSITIVE,
    "model.ffn.every": POSITIVE,
    "model.ffn.first": COUNT,
    "model.ffn.capacity": number(gt=0),
    "model.ffn.top_k": POSITIVE,
    "model.ffn.threshold_decay": number(ge=0, lt=1),
    "model.ffn.inference": choice("dynamic", "interval", "static"),
    "model.ffn.static_capacity": number(gt=0),
    "model.ffn.swiglu": BOOLEAN,
    "model.ffn.shared_experts": COUNT,
    "model.ffn.capacity_schedule": STAGES,
    "model.ffn.ec_inference": choice("static", "dynamic"),
    "model.ffn.interval_threshold": FRACTION,
    "model.unet.model_channels": POSITIVE,
    "model.unet.channel_mult": MULTIPLIERS,
    "model.unet.num_res_blocks": POSITIVE,
    "model.unet.attention_resolutions": SIZES,
    "model.unet.num_heads": POSITIVE,
    "model.unet.num_head_channels": ("-1 (use num_heads) or an integer >= 1",
                                     lambda v: _is_int(v) and (v == -1 or v >= 1)),
    "model.unet.use_scale_shift_norm": BOOLEAN,
    "model.unet.resblock_updown": BOOLEAN,
    "model.unet.use_new_attention_order": BOOLEAN,
    "model.unet.dropout": number(ge=0, lt=1),
    "diffusion.objective": choice("gaussian", "flow"),
    "diffusion.schedule": TEXT,
    "diffusion.num_timesteps": integer(2),
    "diffusion.t_range": INTERVAL,
    "loss.weighting": TEXT,
    "loss.min_snr_gamma": number(gt=0),
    "loss.p2_gamma": number(ge=0),
    "loss.p2_k": number(gt=0),
    "loss.uw_clusters": POSITIVE,
    "loss.uw_learning_rate": number(gt=0),
    "loss.prior_weight": number(ge=0),
    "loss.load_balance_weight": number(ge=0),
    "loss.capacity_weight": number(ge=0),
    "data.name": choice("digits", "digits_text", "latents", "tfds", "pixels"),
    "data.dir": TEXT,
    "data.tfds_name": TEXT,
    "data.split": TEXT,
    "data.image_size": POSITIVE,
    "data.hflip": BOOLEAN,
    "data.latent_scale": number(gt=0),
    "data.num_workers": COUNT,
    "data.seed": SEED,
    "text.encoder_dir": TEXT,
    "vae.weights": TEXT,
    "vae.block_out_channels": WIDTHS,
    "vae.layers_per_block": POSITIVE,
    "vae.norm_num_groups": POSITIVE,
    "vae.latent_channels": POSITIVE,
    "vae.batch_size": POSITIVE,
    "train.global_batch_size": POSITIVE,
    "train.num_steps": COUNT,
    "train.learning_rate": number(gt=0),
    "train.warmup_steps": COUNT,
    "train.weight_decay": number(ge=0),
    "train.b1": number(ge=0, lt=1),
    "train.b2": number(ge=0, lt=1),
    "train.eps": number(gt=0),
    "train.grad_clip_norm": number(ge=0),
    "train.ema_decay": FRACTION,
    "train.log_every": POSITIVE,
    "train.checkpoint_every": POSITIVE,
    "train.keep_checkpoints": POSITIVE,
    "train.async_checkpointing": BOOLEAN,
    "train.sample_every": COUNT,
    "train.nonfinite": choice("stop", "skip", "warn"),
    "train.remat_policy": choice("none", "full", "dots_saveable"),
    "train.profile_steps": TEXT,
    "train.compilation_cache": TEXT,
    "train.grad_accum_steps": POSITIVE,
    "train.loss_buckets": COUNT,
    "train.wandb_project": TEXT,
    "train.wandb_mode": choice("online", "offline", "disabled"),
    "train.init_from": TEXT,
    "train.init_ema": choice("checkpoint", "params"),
    "sample.num_samples": POSITIVE,
    "sample.batch_size": POSITIVE,
    "sample.sampler": TEXT,
    "sample.num_steps": POSITIVE,
    "sample.eta": FRACTION,  # DDIM: 0 = deterministic, 1 = DDPM's posterior variance
    "sample.atol": number(gt=0),
    "sample.rtol": number(gt=0),
    "sample.cfg_scale": number(ge=0),
    "sample.cfg_channels": integer(0),
    "sample.cfg_pool": choice("separate", "joint"),
    "sample.labels": TEXT,
    "sample.prompts": TEXT,
    "sample.captions_file": TEXT,
    "sample.clip_denoised": BOOLEAN,
    "sample.seed": SEED,
    "eval.eval_every": COUNT,
    "eval.num_samples": POSITIVE,
    "eval.reference_npz": TEXT,
    "eval.inception_weights": TEXT,
    "eval.batch_size": POSITIVE,
    "mesh.data": MESH_SIZE,
    "mesh.fsdp": MESH_SIZE,
    "mesh.expert": MESH_SIZE,
}


def _is_section(node) -> bool:
    return hasattr(node, "keys") and hasattr(node, "items")


def flatten(node, prefix: str = "") -> dict[str, Any]:
    """{"train.num_steps": 3000, ...}: every leaf of a (nested) config."""
    out = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if _is_section(value):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _default_rule(default) -> Rule:
    """For a base field without an entry above: the type of its default."""
    if default is None:
        return "None", lambda v: True
    kind = float if isinstance(default, float) else type(default)
    name = {float: "a number", int: "an integer", bool: "True or False", str: "a string"}.get(
        kind, f"a {kind.__name__}")
    if kind is float:
        return name, _is_number
    if kind is int:
        return name, _is_int
    return name, lambda v: isinstance(v, kind)


def rule_for(path: str, default=None) -> Rule:
    return FIELD_RULES.get(path) or _default_rule(default)


def nearest(name: str, known) -> str:
    """The known name most like `name` (always one: a hint beats none)."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.0)
    return close[0] if close else known[0]


def unknown_field_message(base, path: str) -> str | None:
    """One sentence for a dotted `path` that the base config lacks, else None."""
    node, parts = base, path.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if not _is_section(node):
            return (f"config.{where} is a value, not a section, so config.{path} does not "
                    f"exist; set --config.{where}=VALUE.")
        if part not in node:
            label = f"config.{where}" if where else "config"
            kind = "field" if depth == len(parts) - 1 else "section"
            keys = list(node.keys())
            near = nearest(part, keys)
            near_path = f"config.{where}.{near}" if where else f"config.{near}"
            listing = ", ".join(sorted(keys)) if where == "" else None
            return (f"{label} has no {kind} {part!r}; the nearest known name is {near_path}"
                    + (f" (sections and fields: {listing})." if listing else "."))
        node = node[part]
    return None


def check_fields(config, base=None) -> None:
    """Unknown fields first (a typo makes every later message misleading), then each field."""
    if base is None:
        from switch_dit_jax.config_base import get_base_config
        base = get_base_config()
    given, defaults = flatten(config), flatten(base)
    unknown = [(p, m) for p in given if (m := unknown_field_message(base, p))]
    if unknown:
        message, more = unknown[0][1], [p for p, _ in unknown[1:]]
        if more:
            shown = ", ".join(f"config.{p}" for p in more[:3]) + (", ..." if len(more) > 3 else "")
            message = f"{message[:-1]} ({len(more)} more unknown: {shown})."
        raise ConfigError(message)
    for path, value in given.items():
        if path not in defaults:  # the base has a section here: a value replaced it
            raise ConfigError(f"config.{path}={value!r} replaces a section of fields; set its "
                              f"fields instead (--config.{path}.FIELD=VALUE).")
        desc, ok = rule_for(path, defaults[path])
        if not ok(value):
            raise ConfigError(f"config.{path}={value!r} must be {desc}.")
