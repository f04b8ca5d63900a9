"""Which config fields a checkpoint must share with the run that resumes it.

A checkpoint stores the fingerprint of its config; a resume compares it with the current one
and refuses, naming each differing field, when the network, the diffusion, the data stream or
the optimizer state's meaning would change.
"""
from __future__ import annotations

import json
from typing import Any

from switch_dit_jax.config_base import get_base_config

# Fields of config.model that choose how the same network is executed (memory, kernels), not
# which network it is: switching them on resume is legitimate and keeps every parameter valid.
_EXECUTION_ONLY_MODEL_FIELDS = frozenset({"attention_impl"})
# Data fields that identify the example stream; data.dir is left out so a dataset can move.
_DATA_FIELDS = ("name", "tfds_name", "split", "image_size", "latent_scale", "seed")
# Optimizer fields whose change would silently alter the optimizer state's meaning. The
# learning rate, warm-up and EMA decay are left out: changing them on resume is a common choice.
_OPTIMIZER_FIELDS = ("global_batch_size", "b1", "b2", "eps", "weight_decay")


class ConfigMismatchError(ValueError):
    """The config a checkpoint was written with differs from the current one in a resume field."""


def _jsonable(value):
    # Round-trip through JSON so that a fingerprint compares equal to its saved copy (tuples
    # become lists, numpy scalars become Python numbers).
    return json.loads(json.dumps(value, default=str))


def _flatten(prefix: str, node, out: dict, skip=frozenset()):
    for key in sorted(node.keys()):
        if key in skip:
            continue
        value = node[key]
        if hasattr(value, "keys"):
            _flatten(f"{prefix}.{key}", value, out)
        else:
            out[f"{prefix}.{key}"] = value


def config_fingerprint(config) -> dict:
    """The config fields that must match for a checkpoint to be resumed, as {"a.b": value}.

    All of `model` (except execution-only switches) and `diffusion`, the identity of the data
    stream, the global batch size and the optimizer hyperparameters that shape its state.
    Not included: run length, intervals, learning-rate schedule, EMA decay, workers, mesh, sample.
    """
    fp: dict[str, Any] = {}
    _flatten("model", config.model, fp, skip=_EXECUTION_ONLY_MODEL_FIELDS)
    _flatten("diffusion", config.diffusion, fp)
    for key in _DATA_FIELDS:
        fp[f"data.{key}"] = config.data.get(key)
    for key in _OPTIMIZER_FIELDS:
        fp[f"train.{key}"] = config.train.get(key)
    # Clipping adds a state entry to the optax chain; its threshold is free to change.
    fp["train.grad_clip_norm>0"] = bool((config.train.get("grad_clip_norm") or 0) > 0)
    # ANT-UW adds learnable log-variances to the parameters; the other weightings change no state.
    loss = config.get("loss") or {}
    fp["loss.weighting==ant_uw"] = loss.get("weighting") == "ant_uw"
    return _jsonable(fp)


def fingerprint_diff(saved: dict, current: dict) -> list[str]:
    """The fields that differ, as "key: checkpoint A, config B".

    A field that the checkpoint lacks (it was written before the field existed) counts as
    equal when this config holds the field's default, i.e. the behaviour older code had.
    """
    defaults = config_fingerprint(get_base_config())
    absent = object()
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, absent), current.get(key, absent)
        if a is absent and key in defaults and b == defaults[key]:
            continue
        if a != b:
            show = lambda v: "<absent>" if v is absent else json.dumps(v)
            diffs.append(f"{key}: checkpoint {show(a)}, config {show(b)}")
    return diffs
