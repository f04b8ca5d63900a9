"""An official PyTorch checkpoint as this package's first checkpoint of a run directory.

    python -m switch_dit_jax.train.import_official --config=configs/dtr_l.py --workdir=DIR \
        --family=dtr --weights=model.npz [--ema_weights=ema.npz] [--step=400000]

converts the state dicts (`.npz` / `.safetensors`, made from the official `.pt` as
models/convert.py shows; `--family` one of convert.FAMILIES, or `adm` for OpenAI's
guided-diffusion UNet with a `model.backbone="adm"` config) by models/convert.py and saves
them as the checkpoint of `--step` in DIR: `--weights` become the trained parameters,
`--ema_weights` (default: the same file) the EMA parameters that sampling and evaluation use,
and DiffMoE's thresholds the model state. The optimizer starts afresh (the official Adam
moments are not imported). Afterwards `main --mode=sample|eval --workdir=DIR` samples and
evaluates the official model, and `main --workdir=DIR` continues its training from `--step`
with the same config (the data stream of the continued run starts at the data seed).
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from switch_dit_jax import parallel
from switch_dit_jax.data import pipeline
from switch_dit_jax.errors import UserError
from switch_dit_jax.models import build_model, convert
from switch_dit_jax.train import checkpoint as ckpt_lib
from switch_dit_jax.train.state import create_train_state, make_optimizer, state_shardings

log = logging.getLogger("switch_dit_jax")


FAMILIES = tuple(convert.FAMILIES) + ("adm",)


def _variables(path: str, model_config, family: str) -> dict:
    state_dict = convert.load_state_dict(path)
    if family == "adm":
        return {"params": convert.from_adm_state_dict(state_dict, model_config)}
    return convert.from_official_state_dict(state_dict, model_config, family)


def import_to_workdir(config, workdir: str, family: str, weights: str,
                      ema_weights: str | None = None, step: int = 0) -> int:
    """Save the converted official weights as the step-`step` checkpoint of `workdir`; returns
    the step. Refuses a workdir that already holds a checkpoint."""
    if not isinstance(step, int) or step < 0:
        raise UserError(f"--step={step!r} must be an integer >= 0 (the official run's "
                        "iteration count, from which training continues).")
    if family not in FAMILIES:
        raise UserError(f"--family={family!r} is not one of {list(FAMILIES)}.")
    live = _variables(weights, config.model, family)
    ema = live if not ema_weights or ema_weights == weights else \
        _variables(ema_weights, config.model, family)
    model = build_model(config.model)
    tx = make_optimizer(config.train, config.loss)
    mesh = parallel.make_mesh(config.mesh)
    _, shardings = state_shardings(model, tx, mesh, config.loss)
    state = create_train_state(model, tx, jax.random.PRNGKey(config.seed), mesh, config.loss)

    def with_model(params, variables):  # loss-weighting entries (ANT-UW) keep their init
        return {**params, **variables["params"]}

    params = with_model(state.params, live)
    state = state.replace(
        step=jnp.asarray(step, state.step.dtype), params=params, opt_state=tx.init(params),
        ema_params=with_model(state.ema_params, ema),
        model_state={k: v for k, v in live.items() if k != "params"},
        ema_model_state={k: v for k, v in ema.items() if k != "params"})
    state = jax.device_put(state, shardings)
    loader = pipeline.make_train_loader(config.data, config.train.global_batch_size,
                                        jax.process_index(), jax.process_count())
    with ckpt_lib.Checkpointer(workdir, config, max_to_keep=config.train.keep_checkpoints,
                               async_save=False) as checkpointer:
        if checkpointer.latest_step() is not None:
            raise UserError(f"--workdir={workdir!r} already holds the checkpoint of step "
                            f"{checkpointer.latest_step()}; import into a new directory.")
        checkpointer.save(step, state, iter(loader), force=True)
    log.info("imported %s weights %s as step %d of %s", family, weights, step, workdir)
    return step


def main(argv) -> None:
    del argv
    from absl import flags
    f = flags.FLAGS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        import_to_workdir(f.config, f.workdir, f.family, f.weights, f.ema_weights or None,
                          f.step)
    except (FileNotFoundError, UserError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    from absl import app, flags as absl_flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file of the model.",
                                    lock_config=True)
    absl_flags.DEFINE_string("workdir", None, "New run directory for the checkpoint.")
    absl_flags.DEFINE_enum("family", None, list(FAMILIES), "Official code base.")
    absl_flags.DEFINE_string("weights", None, "Converted state dict (.npz / .safetensors).")
    absl_flags.DEFINE_string("ema_weights", "", "Its EMA state dict (default: --weights).")
    absl_flags.DEFINE_integer("step", 0, "Iterations the official run trained.")
    absl_flags.mark_flags_as_required(["config", "workdir", "family", "weights"])
    app.run(main)
