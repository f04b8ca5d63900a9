"""Warm starts (train.init_from): a new run's weights from another checkpoint, step 0.

Sources: a workdir of this project (its newest checkpoint), its `checkpoints/` directory or
one step directory `checkpoints/<step>`; or an official DiT or OpenAI ADM state dict converted
to `.npz` / `.safetensors` (models/convert.py; other official families: import them into a
workdir with `train.import_official` first), whose weights (the released EMA) serve as both params and
EMA. `train.init_ema`: "checkpoint" takes the EMA from the source, "params" starts the EMA as a
copy of the loaded params.

Every parameter of the new model that the source has is taken from it, and must have the same
shape (a mismatch is refused naming the parameter); the others keep their own initialisation
and are listed by name in the log. So a DiT checkpoint warm-starts a Switch-DiT or DTR of the
same size: the routers are new, and Switch-DiT's "_init" designs, whose experts start at zero
(mask m = 1), start exactly as that DiT. Model state (DiffMoE thresholds) is taken the same way
from a project checkpoint. The optimizer state is fresh (Adam's moments do not depend on the
parameter values) and the step counter stays 0; a workdir that already has a checkpoint
resumes it and ignores init_from.
"""
from __future__ import annotations

import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from switch_dit_jax.errors import UserError

log = logging.getLogger("switch_dit_jax")

OFFICIAL_SUFFIXES = (".npz", ".safetensors")
_PARTS = ("params", "ema_params", "model_state", "ema_model_state")
NULL_ROW_TABLE = "label_emb/embedding"  # the ADM UNet's class table


def step_directory(path: str) -> str:
    """The checkpoint step directory that `path` names (itself, or the newest under it)."""
    if os.path.isdir(os.path.join(path, "state")):
        return path
    root = os.path.join(path, "checkpoints") if os.path.isdir(
        os.path.join(path, "checkpoints")) else path
    steps = sorted(int(n) for n in (os.listdir(root) if os.path.isdir(root) else [])
                   if n.isdigit() and os.path.isdir(os.path.join(root, n, "state")))
    if not steps:
        raise UserError(f"config.train.init_from={path!r} holds no checkpoint of this project "
                        "(no checkpoints/<step>/state); pass a workdir, a checkpoint step "
                        "directory, or an official .npz / .safetensors file.")
    return os.path.join(root, str(steps[-1]))


def _read_project_checkpoint(step_dir: str) -> dict:
    """{params, ema_params, model_state, ema_model_state} of a step directory, on the host CPU
    (the optimizer state is not read)."""
    state_dir = os.path.abspath(os.path.join(step_dir, "state"))
    tree = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu),
                          {k: tree[k] for k in _PARTS if k in tree})
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    return jax.device_get(restored)


def read_source(path: str, model_config) -> tuple[dict, str]:
    """({part: nested dict of arrays}, what it is, for the log)."""
    path = os.path.expanduser(path)
    if path.endswith(OFFICIAL_SUFFIXES):
        from switch_dit_jax.models import convert, resolve_model_config
        resolved = resolve_model_config(model_config)
        state_dict = convert.load_state_dict(path)
        if resolved["backbone"] == "adm":
            # OpenAI's ADM has no null class: import it without one; a CFG model's null row
            # then keeps its init (`merge`). DTR / R-TR add no parameters.
            adm = dict(resolved, class_dropout_prob=0.0, routing={"kind": "none"})
            params = jax.device_get(convert.from_adm_state_dict(state_dict, adm))
            return {"params": params, "ema_params": params}, f"OpenAI ADM weights {path}"
        # An official DiT file holds the plain backbone: convert it for the same size without
        # routing or mixtures; the target's extra parameters (routers) keep their init.
        backbone = dict(resolved, routing={"kind": "none"}, ffn={"kind": "mlp"})
        params = jax.device_get(convert.from_torch_state_dict(state_dict, backbone))
        return {"params": params, "ema_params": params}, f"official weights {path}"
    step_dir = step_directory(path)
    return _read_project_checkpoint(step_dir), f"checkpoint {step_dir}"


def merge(init: dict, source: dict, part: str, where: str) -> tuple[dict, list[str], list[str]]:
    """(init with every entry the source has replaced by it, names taken, names kept)."""
    flat_init = traverse_util.flatten_dict(init, sep="/")
    flat_source = traverse_util.flatten_dict(source, sep="/")
    merged, taken, kept = {}, [], []
    for name, value in flat_init.items():
        if name not in flat_source:
            merged[name] = value
            kept.append(name)
            continue
        given = np.asarray(flat_source[name])
        if name == NULL_ROW_TABLE and given.shape[1:] == tuple(value.shape[1:]) \
                and given.shape[0] + 1 == value.shape[0]:
            # A class table without the null row (OpenAI's ADM) fills every class row; the
            # null row of classifier-free guidance keeps its init.
            merged[name] = np.concatenate([given.astype(value.dtype),
                                           np.asarray(value)[-1:]], axis=0)
            taken.append(name)
            kept.append(f"{name}[null row]")
            continue
        if given.shape != tuple(value.shape):
            raise UserError(f"config.train.init_from: {part} {name} has shape {given.shape} in "
                            f"the {where} but {tuple(value.shape)} in this model; warm starts "
                            "need a model of the same size (depth, width, patch, classes, "
                            "learn_sigma).")
        merged[name] = given.astype(value.dtype)
        taken.append(name)
    return traverse_util.unflatten_dict(merged, sep="/"), taken, kept


def _summary(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def warm_start(state, config, shardings):
    """`state` (a fresh TrainState at step 0) with params, EMA and model state from
    config.train.init_from, placed with `shardings`; what was taken is logged."""
    t = config.train
    source, where = read_source(t.init_from, config.model)
    host = jax.device_get({k: getattr(state, k) for k in _PARTS})
    params, taken, kept = merge(host["params"], source["params"], "parameter", where)
    ema_source = source["ema_params"] if t.init_ema == "checkpoint" else source["params"]
    ema, _, _ = merge(host["ema_params"], ema_source, "EMA parameter", where)
    new = {"params": params, "ema_params": ema}
    for part in ("model_state", "ema_model_state"):
        new[part], _, _ = merge(host[part], source.get(part, {}), part.replace("_", " "), where)
    unused = sorted(set(traverse_util.flatten_dict(source["params"], sep="/"))
                    - set(traverse_util.flatten_dict(host["params"], sep="/")))
    log.info("warm start from the %s: %d parameters taken, EMA from the %s; %d keep their "
             "initialisation%s%s", where, len(taken),
             "source" if t.init_ema == "checkpoint" else "loaded params", len(kept),
             f" ({_summary(kept)})" if kept else "",
             f"; not in this model, unused: {_summary(unused)}" if unused else "")
    placed = {k: jax.device_put(v, getattr(shardings, k)) for k, v in new.items()}
    return state.replace(**placed)
