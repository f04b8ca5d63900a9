"""Entry point: python -m switch_dit_jax.main --config=configs/NAME.py --workdir=DIR [--mode=...]

Config fields can be overridden on the command line: --config.train.num_steps=1000.
On several hosts, every process runs the same command; `jax.distributed.initialize()` is
called when a cluster is detected (SLURM, Cloud TPU, or the JAX_COORDINATOR_ADDRESS /
--coordinator_address settings), before anything touches the devices.
"""
from __future__ import annotations

import gc
import logging
import os
import sys
import traceback

from absl import app, flags
from ml_collections import ConfigDict, config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to run.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for a multi-process run (else auto-detected).")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool("verbose", False, "Also print the traceback of errors a user can fix (bad "
                  "config values, files, paths), which are otherwise one line.")

log = logging.getLogger("switch_dit_jax")


def _cluster_detected() -> bool:
    env = os.environ
    return (int(env.get("SLURM_NTASKS", "1")) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", "")
            or bool(env.get("JAX_COORDINATOR_ADDRESS")))


def initialize_distributed() -> None:
    # A scheduler's SIGTERM from here on ends a trainer cleanly, start-up included.
    from switch_dit_jax.train import early_signal
    if FLAGS.mode == "train":
        early_signal.install()
    import jax
    # A dead peer must end the survivors within seconds, not JAX's 100 s / 300 s: a missed
    # heartbeat makes jax.distributed stop every process (train.peers prints the one line
    # when the error reaches Python first), and a process that fails alone waits this long
    # for the others at exit. SWITCH_DIT_HEARTBEAT_TIMEOUT_S / _SHUTDOWN_TIMEOUT_S override.
    timeouts = dict(
        heartbeat_timeout_seconds=int(os.environ.get("SWITCH_DIT_HEARTBEAT_TIMEOUT_S", "10")),
        shutdown_timeout_seconds=int(os.environ.get("SWITCH_DIT_SHUTDOWN_TIMEOUT_S", "30")))
    if FLAGS.coordinator_address or FLAGS.num_processes:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id, **timeouts)
    elif _cluster_detected():
        jax.distributed.initialize(**timeouts)
    else:
        return
    from switch_dit_jax.train import preemption
    if early_signal.received() and preemption._jax_preemption_service():  # pylint: disable=protected-access
        # JAX's notifier replaced our handler; pass the notice on so every process agrees.
        import signal
        os.kill(os.getpid(), signal.SIGTERM)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _raised_here(e: BaseException) -> bool:
    """Whether this package's own code raised `e` (not a library under it)."""
    frames = traceback.extract_tb(e.__traceback__)
    package = os.path.dirname(os.path.abspath(__file__))
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(package + os.sep)


def _is_user_error(e: BaseException) -> bool:
    """Errors a user can fix: our error types, and the ValueError / OSError sentences this
    package raises about bad values and paths (DESIGN.md §6: one sentence, so it ends with a
    full stop, which Python's and the libraries' own messages rarely do). Anything else is a
    bug report and keeps its traceback."""
    from switch_dit_jax.errors import UserError
    checkpoint = sys.modules.get("switch_dit_jax.train.checkpoint")  # not loaded: not raised
    mismatch = (checkpoint.ConfigMismatchError,) if checkpoint else ()
    return (isinstance(e, (UserError, *mismatch))
            or (isinstance(e, (ValueError, OSError)) and _raised_here(e)
                and str(e).rstrip().endswith(".")))


def _verbose_requested(argv) -> bool:
    return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1")
               for a in argv)


def _config_path(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg[len("--config="):]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _explain_flag_error(argv, error: Exception) -> str:
    """One sentence for a failed flag parse: the config file, an unknown --config.* field (with
    the nearest known name), or absl's own first line."""
    from switch_dit_jax import config_fields
    from switch_dit_jax.config_base import load_config
    path = _config_path(argv)
    if path:
        try:
            config = load_config(path)
        except FileNotFoundError as e:
            return str(e)
        except Exception as e:  # an error inside the config file: say where
            frames = [f for f in traceback.extract_tb(e.__traceback__)
                      if os.path.abspath(f.filename) == os.path.abspath(path.partition(":")[0])]
            where = f" (line {frames[-1].lineno})" if frames else ""
            return (f"config file {path!r} failed to load{where}: {type(e).__name__}: "
                    f"{_one_line(e)}")
        for arg in argv:
            if arg.startswith("--config."):
                field = arg[len("--config."):].partition("=")[0]
                message = config_fields.unknown_field_message(config, field)
                if message:
                    return message
    text = _one_line(error)
    return text if isinstance(error, flags.Error) else f"{type(error).__name__}: {text}"


def parse_flags(argv):
    """absl's flag parsing, with a bad flag or --config.* override as one line."""
    try:
        return FLAGS(argv)
    except Exception as e:  # ml_collections raises KeyError / AttributeError for unknown fields
        if _verbose_requested(argv):
            raise
        message = _explain_flag_error(argv, e)
    sys.exit(f"error: {message}")


def _loaded_config():
    from switch_dit_jax.errors import ConfigError
    config = FLAGS.config
    if isinstance(config, ConfigDict):
        return config
    path = config_flags.get_config_filename(FLAGS["config"])
    if type(config).__name__ == "_ErrorConfig":  # config_flags defers a failed load to first use
        if not os.path.exists(path.partition(":")[0]):
            raise FileNotFoundError(f"config file {path!r} does not exist; pass "
                                    "--config=configs/NAME.py.")
        raise ConfigError(f"config file {path!r} cannot be read; pass a readable "
                          "configs/NAME.py.")
    raise ConfigError(f"config file {path!r}: get_config() returned {type(config).__name__}, "
                      "not a ConfigDict; return the config built from get_base_config().")


def run() -> None:
    config = _loaded_config()
    from switch_dit_jax import config_fields, validation
    # Before any device or network work, so that every host of a cluster fails at once.
    config_fields.check_fields(config)
    validation.check_workdir(FLAGS.workdir, create=FLAGS.mode == "train")
    if FLAGS.mode == "train":
        from switch_dit_jax import cpu_tuning
        cpu_tuning.for_config(config)  # before anything starts XLA's threads
    initialize_distributed()

    import jax
    from switch_dit_jax.train import loop

    if jax.process_index() == 0:
        log.info("process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.devices()[0].platform)
        log.info("config:\n%s", config)
    if FLAGS.mode == "train":
        loop.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        loop.sample_from_workdir(config, FLAGS.workdir)
    else:
        loop.evaluate_workdir(config, FLAGS.workdir)


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if not FLAGS["config"].present or not FLAGS.workdir:
        sys.exit("error: pass --config=configs/NAME.py and --workdir=DIR.")
    try:
        run()
        return
    except Exception as e:
        if FLAGS.verbose or not _is_user_error(e):
            raise
        message = _one_line(e)
    # Out of the except block the traceback is gone, so objects its frames held (grain
    # iterators, checkpoint managers) are closed now, while their modules still exist,
    # rather than at interpreter exit with noise on stderr.
    gc.collect()
    sys.exit(f"error: {message}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
