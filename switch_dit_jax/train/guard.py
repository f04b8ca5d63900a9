"""The non-finite guard (train.nonfinite): a diverged run is noticed, named and never saved.

The train step reports, per step and on the device, whether its loss and gradient norm were
finite (`metrics[FINITE]`). The loop keeps those flags unread until a boundary where it
touches the host anyway (logging, a checkpoint, samples), so a healthy run pays no extra
device-to-host sync per step. Before every save the whole train state is checked on the device
(`nonfinite_parts`), whatever the policy: a NaN/inf state is never written.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import jax
import jax.numpy as jnp

from switch_dit_jax.errors import UserError

log = logging.getLogger("switch_dit_jax")

POLICIES = ("stop", "skip", "warn")
# The per-step metric (1.0 or 0.0): the loss and the gradient norm were finite.
FINITE = "finite"
# The TrainState fields a save writes, in the order a message names them.
STATE_PARTS = ("params", "ema_params", "opt_state", "model_state", "ema_model_state")


class NonFiniteError(UserError):
    """Training diverged under train.nonfinite="stop"; the message names the step, the first
    non-finite metric and the last finite checkpoint."""


class NonFiniteStateError(UserError):
    """A save was refused because the train state holds NaN or inf."""

    def __init__(self, step: int, parts: list[str]):
        self.step, self.parts = int(step), list(parts)
        super().__init__(f"not saving the checkpoint of step {self.step}: its "
                         f"{', '.join(self.parts)} hold NaN or inf.")


def _all_finite(tree) -> jax.Array:
    # x * 0 is 0 for every finite x and NaN for NaN/inf, so one sum per leaf says it (and
    # compiles about twice as fast as an isfinite-all per leaf; no copy of the state is made).
    sums = [jnp.sum(x.astype(jnp.float32) * 0) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.isfinite(sum(sums)) if sums else jnp.asarray(True)


@jax.jit
def _finite_by_part(parts: dict) -> dict:
    return {name: _all_finite(tree) for name, tree in parts.items()}


def nonfinite_parts(state) -> list[str]:
    """The fields of a TrainState that hold NaN or inf (empty when all is finite).

    One jitted reduction over the state where it lives; only a few booleans come to the host,
    and every process of a multi-process run gets the same answer.
    """
    parts = {name: getattr(state, name) for name in STATE_PARTS if hasattr(state, name)}
    if not parts:  # not a TrainState: check the tree as a whole
        parts = {"state": state}
    flags = jax.device_get(_finite_by_part(parts))
    return [name for name in parts if not bool(flags[name])]


def first_nonfinite_metric(metrics: dict) -> tuple[str, float] | None:
    """(name, value) of the first NaN/inf metric: the loss, then the gradient norm, then the
    rest by name."""
    order = ["loss", "grad_norm"] + sorted(k for k in metrics if k not in ("loss", "grad_norm"))
    for name in order:
        if name in metrics and name != FINITE:
            value = float(metrics[name])
            if not math.isfinite(value):
                return name, value
    return None


class NonFiniteGuard:
    """Collects the per-step flags of the train step and acts on train.nonfinite at `check()`.

    `last_checkpoint()` describes the newest (finite) checkpoint for the stop message, e.g.
    "step 25 in runs/x/checkpoints"; it returns None when there is none.
    """

    def __init__(self, policy: str, last_checkpoint: Callable[[], str | None]):
        if policy not in POLICIES:
            raise ValueError(f"train.nonfinite={policy!r}; use one of {list(POLICIES)}.")
        self.policy = policy
        self._last_checkpoint = last_checkpoint
        self._pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet checked
        self.nonfinite_steps = 0  # over the whole run (skipped ones, under "skip")

    def record(self, step: int, metrics: dict) -> None:
        self._pending.append((int(step), metrics))

    def check(self) -> None:
        """Reads the pending flags (one transfer of scalars); raises NonFiniteError under "stop"
        at the first non-finite step, logs one line per check under "skip" and "warn"."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = jax.device_get([m[FINITE] for _, m in pending])
        bad = [(step, m) for (step, m), ok in zip(pending, flags) if not ok]
        if not bad:
            return
        self.nonfinite_steps += len(bad)
        step, metrics = bad[0]
        named = first_nonfinite_metric(jax.device_get(metrics)) or ("loss", float("nan"))
        what = f"{named[0]} is {named[1]}"
        if self.policy == "stop":
            raise NonFiniteError(self.stop_message(step, what))
        steps = f"{len(bad)} of the last {len(pending)} steps"
        if self.policy == "skip":
            log.warning("step %d: %s; its update was skipped (train.nonfinite='skip'; %s "
                        "skipped, %d in this run).", step, what, steps, self.nonfinite_steps)
        else:
            log.warning("step %d: %s (train.nonfinite='warn': training goes on; %s were "
                        "non-finite; a non-finite state is never saved).", step, what, steps)

    def stop_message(self, step: int, what: str) -> str:
        latest = self._last_checkpoint()
        if latest:
            saved = (f"the last finite checkpoint is step {latest} and nothing non-finite was "
                     "saved; run again to resume from it")
        else:
            saved = "no checkpoint was written yet (nothing non-finite is saved); run again"
        return (f"training diverged: at step {step} {what} (train.nonfinite='stop'); {saved} "
                "with a lower train.learning_rate (or train.grad_clip_norm), or set "
                "train.nonfinite='skip' to drop such steps.")
