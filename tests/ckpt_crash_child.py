"""Child process of test_checkpoint's crash tests: dies while checkpoint step 2 is being saved.

usage: python tests/ckpt_crash_child.py <workdir> <mode>
  kill_in_commit   SIGKILL itself from Orbax's commit (the rename of the temporary directory),
                   i.e. after every byte of step 2 is written but before it becomes a checkpoint.
  exit_after_save  os._exit(1) as soon as the asynchronous save of step 2 returns.
  no_close         return normally right after the asynchronous save of step 2, without
                   Checkpointer.close(): the exit hook must still commit step 2.
Step 1 is always saved completely first. The test imports the helpers below to rebuild the
exact states and loader.
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain.python as grain  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from switch_dit_jax.config_base import get_base_config  # noqa: E402
from switch_dit_jax.train.state import TrainState  # noqa: E402

BIG = 12_000_000  # float32 elements per big leaf: the state is ~96 MB (params + ema)


def make_config():
    cfg = get_base_config()
    cfg.model.depth = 12
    cfg.train.checkpoint_every = 1
    return cfg


def make_loader():
    source = grain.RangeDataSource(0, 100, 1)
    sampler = grain.IndexSampler(len(source), grain.NoSharding(), shuffle=True, seed=0)
    return grain.DataLoader(data_source=source, sampler=sampler,
                            operations=[grain.Batch(4)], worker_count=0)


def make_state(step: int) -> TrainState:
    params = {"big": jnp.arange(BIG, dtype=jnp.float32) * step,
              "w": jnp.full((8, 4), float(step), jnp.float32)}
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=(),
                      ema_params=params, model_state={}, ema_model_state={})


def _kill_self(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def main(workdir: str, mode: str) -> None:
    from orbax.checkpoint._src.path import atomicity
    from switch_dit_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, make_config(), max_to_keep=3, async_save=True)
    it = iter(make_loader())
    next(it)
    ckpt.save(1, make_state(1), it)
    ckpt.wait()
    next(it)
    if mode == "kill_in_commit":
        # Both commit styles (rename locally, marker file on GCS) end in `finalize`.
        atomicity.AtomicRenameTemporaryPath.finalize = _kill_self
        atomicity.CommitFileTemporaryPath.finalize = _kill_self
    ckpt.save(2, make_state(2), it)
    if mode == "exit_after_save":
        os._exit(1)
    if mode == "no_close":
        return
    ckpt.wait()
    os._exit(3)  # not reached in either mode


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
