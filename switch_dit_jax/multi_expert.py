"""Multi-experts baseline (Switch-DiT Table A, DTR Table 6): K denoisers, member k trained only
on its interval of timesteps (`config.diffusion.t_range`), sampled as one model that hands
every step to the member whose interval holds t.

    # train member k (k = 0..3) in its own workdir
    python -m switch_dit_jax.main --config=configs/multi_experts_b.py:0 --workdir=RUN/0 ...
    # sample with all of them
    python -m switch_dit_jax.multi_expert --config=configs/multi_experts_b.py \
        --workdirs=RUN/0,RUN/1,RUN/2,RUN/3 --outdir=RUN/samples

Member k's config is the config file with argument k; the members' t_ranges must tile
[0, T). Samples go to OUTDIR/samples_<steps>.png and .npz (ADM format), as --mode=sample.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("switch_dit_jax")


def member_starts(t_ranges: Sequence[Sequence[int]], num_timesteps: int) -> np.ndarray:
    """[K] first timestep of every member, after checking that the intervals tile [0, T)."""
    ranges = [tuple(r) for r in t_ranges]
    if [r for r in ranges if r == (0, 0)] or sorted(ranges) != ranges:
        raise ValueError(f"multi-experts members have t_ranges {ranges}; give member k the "
                         "k-th interval, in order (config argument k).")
    ends = [0] + [hi for _, hi in ranges]
    if ends[-1] != num_timesteps or any(lo != end for (lo, _), end in zip(ranges, ends)):
        raise ValueError(f"multi-experts t_ranges {ranges} do not tile [0, {num_timesteps}) "
                         "without gaps or overlaps; train one member per interval.")
    return np.asarray([lo for lo, _ in ranges], np.int32)


def switching_apply(apply_one: Callable, stacked, starts) -> Callable:
    """apply_fn(x, t, y) = apply_one(member_k, x, t, y), member_k = the k-th slice of every leaf
    of `stacked`, k the member whose interval holds t (samplers call a model with one timestep
    for the whole batch, so t[0] decides; only that member's weights are read)."""
    starts = jnp.asarray(starts)

    def apply_fn(x, t, y):
        k = jnp.sum(starts <= jnp.asarray(t).reshape(-1)[0].astype(starts.dtype)) - 1
        return apply_one(jax.tree.map(lambda leaf: leaf[k], stacked), x, t, y)

    return apply_fn


def stack_members(trees: Sequence) -> object:
    """One pytree whose leaves stack the members' leaves along a new leading axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def sample_members(config_path: str, workdirs: Sequence[str], outdir: str) -> dict[str, str]:
    """EMA weights of the newest checkpoint of every member -> one sample grid and .npz."""
    from jax.sharding import NamedSharding, PartitionSpec

    from switch_dit_jax import sample
    from switch_dit_jax.config_base import load_config
    from switch_dit_jax.train.loop import restore_latest
    from switch_dit_jax.train.state import model_params
    from switch_dit_jax.validation import validate_config

    configs = [load_config(f"{config_path}:{k}") for k in range(len(workdirs))]
    for config in configs:
        validate_config(config, jax.device_count(), jax.process_count())
    config = configs[0]
    starts = member_starts([c.diffusion.t_range for c in configs], config.diffusion.num_timesteps)
    restored = [restore_latest(c, w) for c, w in zip(configs, workdirs)]
    model, mesh, _, shardings = restored[0]
    params = stack_members([model_params(r[2].ema_params) for r in restored])
    model_state = stack_members([r[2].ema_model_state for r in restored])

    def apply_one(member, x, t, y):
        return model.apply({"params": member["params"], **member["state"]}, x, t, y)

    def builder(stacked_params, stacked_state):
        return switching_apply(apply_one, {"params": stacked_params, "state": stacked_state},
                               starts)

    stacked_shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, PartitionSpec(None, *s.spec)),
        model_params(shardings.ema_params))
    images, labels = sample.generate(model, config, params, model_state, mesh, stacked_shardings,
                                     apply_builder=builder)
    steps = "_".join(str(int(r[2].step)) for r in restored)
    if config.data.name == "latents":
        latents, images = images, sample.decode_latents(config, images, mesh)
        if images is None:
            return sample.save_latents(os.path.join(outdir, f"latents_{steps}.npz"), latents,
                                       labels)
    images = sample.to_uint8(images)
    paths = {ext: os.path.join(outdir, f"samples_{steps}.{ext}") for ext in ("png", "npz")}
    if jax.process_index() == 0:
        sample.save_png(paths["png"], sample.image_grid(
            images, upscale=sample.grid_upscale(images.shape[1])))
        sample.save_npz(paths["npz"], images, labels)
    log.info("multi-experts samples of %d members: %s", len(workdirs), paths)
    return paths


def main(argv: Sequence[str]) -> None:
    from absl import flags
    flags.DEFINE_string("config", None, "The members' config file (member k = argument k).")
    flags.DEFINE_list("workdirs", None, "Workdirs of members 0, 1, ..., K-1, in order.")
    flags.DEFINE_string("outdir", None, "Directory for the samples.")
    flags.FLAGS(list(argv))
    f = flags.FLAGS
    if not (f.config and f.workdirs and f.outdir):
        sys.exit("error: pass --config=configs/NAME.py, --workdirs=DIR0,DIR1,... and "
                 "--outdir=DIR.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        sample_members(f.config, f.workdirs, f.outdir)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {' '.join(str(e).split())}")


if __name__ == "__main__":
    main(sys.argv)
