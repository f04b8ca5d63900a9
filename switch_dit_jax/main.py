"""Entry point: python -m switch_dit_jax.main --config=configs/NAME.py --workdir=DIR [--mode=...]

Config fields can be overridden on the command line: --config.train.num_steps=1000.
On several hosts, every process runs the same command; `jax.distributed.initialize()` is
called when a cluster is detected (SLURM, Cloud TPU, or the JAX_COORDINATOR_ADDRESS /
--coordinator_address settings), before anything touches the devices.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to run.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for a multi-process run (else auto-detected).")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")

log = logging.getLogger("switch_dit_jax")


def _cluster_detected() -> bool:
    env = os.environ
    return (int(env.get("SLURM_NTASKS", "1")) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", "")
            or bool(env.get("JAX_COORDINATOR_ADDRESS")))


def initialize_distributed() -> None:
    import jax
    if FLAGS.coordinator_address or FLAGS.num_processes:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)
    elif _cluster_detected():
        jax.distributed.initialize()


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if FLAGS.config is None or not FLAGS.workdir:
        sys.exit("error: pass --config=configs/NAME.py and --workdir=DIR.")
    initialize_distributed()

    import jax
    from switch_dit_jax.train import loop
    from switch_dit_jax.train.checkpoint import ConfigMismatchError
    from switch_dit_jax.validation import ConfigError

    config = FLAGS.config
    if jax.process_index() == 0:
        log.info("process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.devices()[0].platform)
        log.info("config:\n%s", config)
    try:
        if FLAGS.mode == "train":
            loop.train_and_evaluate(config, FLAGS.workdir)
        elif FLAGS.mode == "sample":
            loop.sample_from_workdir(config, FLAGS.workdir)
        else:
            loop.evaluate_workdir(config, FLAGS.workdir)
    except (ConfigError, ConfigMismatchError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
