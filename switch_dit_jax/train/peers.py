"""A lost peer in a multi-process run: every survivor prints one sentence and exits at once.

When a process dies (kill -9, a node failure), the survivors' next collective fails (gloo: the
peer's sockets are closed) or a coordination-service barrier does. Unwinding normally would
then wait in Orbax's exit hook and in jax.distributed's shutdown barrier for a peer that never
comes, and end in SIGABRT. `exit_if_lost` instead saves nothing, prints one line and leaves
with os._exit(1). Where no error reaches Python (a survivor blocked outside any collective),
jax.distributed's own heartbeat timeout, set short in `main.initialize_distributed`, ends the
process.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from typing import Callable

log = logging.getLogger("switch_dit_jax")

# Fragments of the errors a dead peer causes (gloo, the coordination service, Orbax barriers).
_LOST = re.compile(r"gloo|connection reset|connection closed|connection refused|broken pipe|"
                   r"end of file|heartbeat|unhealthy|unavailable|barrier|deadline_exceeded|"
                   r"task \d+ .*(failed|error)|coordination service|socket closed", re.I)

_cleanups: list[Callable[[], None]] = []


def on_exit(fn: Callable[[], None]) -> None:
    """`fn` runs before such an exit (e.g. releasing the workdir lock)."""
    _cleanups.append(fn)


def forget(fn: Callable[[], None]) -> None:
    if fn in _cleanups:
        _cleanups.remove(fn)


def _chain(error: BaseException) -> list[BaseException]:
    out, e = [], error
    while e is not None and len(out) < 8:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def is_lost_peer(error: BaseException) -> bool:
    """Whether `error` (in a multi-process run) says that another process is gone."""
    import jax
    from switch_dit_jax.errors import UserError
    if jax.process_count() == 1 or isinstance(error, (UserError, KeyboardInterrupt)):
        return False
    return any(_runtime_error(e) and _LOST.search(str(e)) for e in _chain(error))


def _runtime_error(error: BaseException) -> bool:
    # Only what the runtime raises: a storage error that merely mentions a barrier is no peer's.
    import jax
    return isinstance(error, (jax.errors.JaxRuntimeError, TimeoutError, ConnectionError))


def latest_checkpoint(workdir: str) -> int | None:
    """The newest committed step directory, read from the file system only (no collectives)."""
    directory = os.path.join(workdir, "checkpoints")
    try:
        steps = [int(n) for n in os.listdir(directory)
                 if n.isdigit() and os.path.isdir(os.path.join(directory, n))]
    except OSError:
        return None
    return max(steps) if steps else None


def exit_if_lost(error: BaseException, workdir: str) -> None:
    """Returns when `error` is not a lost peer; otherwise prints one sentence and exits(1)."""
    if not is_lost_peer(error):
        return
    import jax
    cause = next((e for e in reversed(_chain(error))
                  if _runtime_error(e) and _LOST.search(str(e))), error)
    text = " ".join(str(cause).split())
    text = re.sub(r"\s*\[type\.googleapis\.com[^\]]*\]", "", text)
    text = text if len(text) <= 200 else text[:197] + "..."
    latest = latest_checkpoint(workdir)
    kept = (f"the latest checkpoint in {os.path.join(workdir, 'checkpoints')} is step {latest}"
            if latest is not None else "no checkpoint was written yet")
    message = (f"error: process {jax.process_index()} of {jax.process_count()} lost contact with "
               f"another process of this run ({type(cause).__name__}: {text}); it saves nothing "
               f"and exits now, and {kept}.")
    for fn in list(_cleanups):
        try:
            fn()
        except Exception:  # pylint: disable=broad-except
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # pylint: disable=broad-except
            pass
    os.write(2, (message + "\n").encode())
    # Not sys.exit: the exit hooks would wait for the dead peer (see the module docstring).
    os._exit(1)
