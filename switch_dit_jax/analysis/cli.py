"""The command line every analysis tool shares: `--config` and `--workdir`, the latest
checkpoint restored, and a user's mistake (no checkpoint, a bad file) shown as one line."""
from __future__ import annotations

import logging
from typing import Any, Callable

from switch_dit_jax.errors import UserError


def run_on_workdir(report: Callable[..., Any],
                   extra_flags: Callable[[Any], None] | None = None) -> None:
    """Parses the flags, restores the run and calls
    `report(config, workdir, model, mesh, state, shardings, flags)`.

    `extra_flags(absl_flags)` defines the tool's own flags before parsing.
    """
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory with checkpoints.")
    if extra_flags is not None:
        extra_flags(flags)

    def main(argv) -> None:
        del argv
        from switch_dit_jax.train.loop import restore_latest

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
        try:
            model, mesh, state, shardings = restore_latest(config, workdir)
            report(config, workdir, model, mesh, state, shardings, flags.FLAGS)
        except (FileNotFoundError, UserError) as e:
            raise SystemExit(f"error: {e}") from None

    app.run(main)
