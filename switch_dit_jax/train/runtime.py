"""Execution habits of long runs: the persistent compilation cache and profiler traces."""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("switch_dit_jax")


def compilation_cache_dir(setting: str, workdir: str) -> str | None:
    """train.compilation_cache -> the cache directory ("workdir", a path, or "" for none)."""
    if not setting:
        return None
    path = os.path.join(workdir, "compilation_cache") if setting == "workdir" else setting
    return os.path.abspath(os.path.expanduser(path))


def enable_compilation_cache(setting: str, workdir: str) -> str | None:
    """Point JAX's persistent cache at the configured directory, so that a preempted and
    restarted job loads its compiled train step instead of compiling it again."""
    path = compilation_cache_dir(setting, workdir)
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # e.g. sampling from a read-only workdir: run without the cache
        log.warning("no compilation cache: cannot create %s (%s).", path, e.strerror)
        return None
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        log.info("persistent compilation cache: %s", path)
    return path


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """"20-25" -> (20, 25), "7" -> (7, 7), "" -> None (train.profile_steps)."""
    text = str(text).strip()
    if not text:
        return None
    first, dash, last = text.partition("-")
    try:
        span = (int(first), int(last if dash else first))
    except ValueError:
        span = None
    if span is None or not 1 <= span[0] <= span[1]:
        raise ValueError(f"train.profile_steps={text!r} must be a step or a range of steps "
                         "like '20-25' (steps count from 1).")
    return span


class StepProfiler:
    """A jax.profiler trace of the train steps in `span`, written to `logdir` (TensorBoard's
    profile plugin or Perfetto read it)."""

    def __init__(self, span: tuple[int, int] | None, logdir: str):
        self.span, self.logdir, self.active = span, logdir, False

    def before(self, step: int) -> None:
        if self.span and step == self.span[0]:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step == self.span[1]:
            jax.block_until_ready(outputs)  # the trace must hold the whole last step
            self.stop()
            log.info("profile of steps %d-%d written to %s", *self.span, self.logdir)

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
