"""PreemptionGuard: a scheduler's SIGTERM becomes "save a checkpoint and stop" at a step that
every process agrees on."""
from __future__ import annotations

import logging
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

from switch_dit_jax.train import early_signal

log = logging.getLogger("switch_dit_jax")


class StartupStop(Exception):
    """SIGTERM arrived before the first train step; the message says what was saved."""


def _jax_preemption_service() -> bool:
    """Whether jax.distributed runs its preemption sync manager (its C++ SIGTERM notifier)."""
    try:
        from jax._src import distributed  # pylint: disable=g-import-not-at-top
        state = distributed.global_state
        return state.client is not None and state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


class PreemptionGuard:
    """Context manager turning SIGTERM (a scheduler's preemption notice) into a stop flag.

    Use: `with PreemptionGuard() as guard: ... if guard.should_stop(step): save, break`.
    Call `should_stop(step)` once per training step on every process with the same `step`.

    Multi-process agreement, in order of preference:
    * jax.distributed with its preemption service (the default): JAX's C++ notifier already
      catches SIGTERM and the coordination service picks a sync step (max step seen + 1);
      `should_stop` is `multihost_utils.reached_preemption_sync_point(step)`, which costs
      nothing until a notice arrives. No Python handler is installed in this mode, because
      `signal.signal` would replace the C++ handler and the notice would never reach JAX. The
      sync step comes a few steps after the signal (the notifier polls once a second).
    * otherwise (one process, or the service disabled): a Python handler sets a local flag; with
      several processes, `should_stop` ORs the flags with `process_allgather` (one tiny
      collective per call), so all processes stop at the same step.
    """

    def __init__(self):
        self.received = False  # set by the Python handler when it is in use
        self._stopped = False
        self._old_handler = None
        self._installed = False
        self.mode = None  # "jax_sync" | "allgather" | "local", chosen on entry

    def _handle(self, signum, frame):
        del frame
        if not self.received:
            log.warning("received signal %d: stopping at the next step boundary.", signum)
        self.received = True

    def __enter__(self) -> "PreemptionGuard":
        if _jax_preemption_service():
            self.mode = "jax_sync"
        else:
            self.mode = "allgather" if jax.process_count() > 1 else "local"
            # signal.signal raises ValueError off the main thread: the guard belongs in main().
            self._old_handler = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
            if early_signal.received() and not self.received:
                # main's early handler caught it during imports / jax.distributed start-up.
                self._handle(signal.SIGTERM, None)
        return self

    def raise_if_received(self, what) -> None:
        """During start-up (before the loop's first `should_stop`): raises StartupStop when this
        process got SIGTERM; `what()` gives the sentence on what was saved. Local only: no
        collective, so it may be called anywhere."""
        if self.received:
            raise StartupStop(f"SIGTERM during start-up: exiting before training; {what()}")

    def __exit__(self, *exc) -> None:
        if self._installed:
            # getsignal() gives None for a handler installed outside Python; the default is the
            # closest thing we can put back. (main's early handler goes back too: a SIGTERM
            # while the finished trainer exits changes nothing, and the exit status stays 0.)
            old = self._old_handler if self._old_handler is not None else signal.SIG_DFL
            signal.signal(signal.SIGTERM, old)
            self._installed = False

    def should_stop(self, step: int) -> bool:
        """True from the step at which this process (and all others) should save and exit."""
        if self._stopped:
            return True
        if self.mode == "jax_sync":
            self._stopped = bool(multihost_utils.reached_preemption_sync_point(int(step)))
        elif self.mode == "allgather":
            flags = multihost_utils.process_allgather(np.asarray(self.received, np.int32))
            self._stopped = bool(np.any(flags))
        else:
            self._stopped = self.received
        return self._stopped
