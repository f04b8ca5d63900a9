"""SIGTERM that arrives before the trainer is up (imports, jax.distributed, start-up).

`main` installs this handler first thing for --mode=train, so that a scheduler's SIGTERM at any
moment ends the run cleanly; `PreemptionGuard` takes the flag over when the trainer starts.
No JAX here: installing it must not wait for JAX to import.
"""
from __future__ import annotations

import signal
import threading

_received: list[int] = []


def _handle(signum, frame) -> None:
    del frame
    _received.append(signum)


def install() -> bool:
    """Installs the handler (main thread only); returns whether it was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _handle)
    return True


def received() -> bool:
    return bool(_received)


def handler():
    return _handle
