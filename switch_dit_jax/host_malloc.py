"""Keep glibc from handing XLA:CPU's step buffers back to the kernel after every step.

A compiled train step asks the host allocator for its temporaries (0.9 GB for DiT-S/2 at batch
8) on every execution. The XLA threads that run it each have a malloc arena of their own, whose
heaps are capped at 64 MB, so glibc serves a block that large with a fresh mmap and unmaps it on
free: each step touches every page anew, ~300 k minor page faults per step, 10 % of the DiT-S/2
step on a 2-core CPU. One arena for the whole process, with no mmap and no trim threshold,
keeps that memory in the heap from one step to the next (malloc still mmaps when the heap
cannot grow). The prices: the process keeps its peak heap (DiT-S/2, batch 8: 2.9 GB resident
instead of 2.0 GB), and every thread allocates from one arena, which costs small steps more
than they gain (the digits quickstart: 29 → 20 steps/s; DiT-S/2 at batch 2: +3 %).

So the settings are applied only for a large step on the CPU: forward work of at least
MIN_FORWARD_MACS per step (DiT-S/2 gains from batch 4 on), and no accelerator plugin that
could take the step instead. They only reach threads that have not yet touched malloc, so
they must precede XLA's backend: `main` applies them right after reading the config.
SWITCH_DIT_HOST_MALLOC=0 never applies them, =1 always does. Linux/glibc only.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import sys

ENV = "SWITCH_DIT_HOST_MALLOC"
MIN_FORWARD_MACS = 20e9  # per step: between DiT-S/2 at batch 2 (12 G, slower) and 4 (24 G, faster)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
# mallopt takes an int that glibc reads as a size_t: -1 is "never"; a glibc that refuses it
# gets the largest int, 2 GiB.
_NEVER, _LARGEST_INT = -1, 2**31 - 1

log = logging.getLogger(__name__)


def accelerator_possible(env=os.environ) -> bool:
    """Whether jax may pick a GPU or TPU here, judged without starting its backend."""
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms != "cpu"
    return bool(list(importlib.metadata.entry_points(group="jax_plugins"))
                or importlib.util.find_spec("libtpu") is not None)


def wanted(config, env=os.environ) -> bool:
    """Whether `config`'s train step on this machine is large and on the CPU (see above)."""
    choice = env.get(ENV, "").strip()
    if choice in ("0", "1"):
        return choice == "1"
    if accelerator_possible(env):
        return False
    from switch_dit_jax.models import build_model, flops
    # "xla": the "auto" attention choice would ask the backend, which must not start yet.
    model = build_model(dict(config.model.to_dict(), attention_impl="xla"))
    per_image = flops.forward_macs_per_image(model)["total"]
    return per_image * config.train.global_batch_size >= MIN_FORWARD_MACS


def apply() -> bool:
    """The settings above, now; True when glibc accepted all of them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # musl and others have no mallopt with these meanings
    except (OSError, AttributeError):
        return False
    accepted = [libc.mallopt(_M_ARENA_MAX, 1) == 1]
    for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD):
        accepted.append(libc.mallopt(option, _NEVER) == 1
                        or libc.mallopt(option, _LARGEST_INT) == 1)
    return all(accepted)


def for_config(config) -> bool:
    """Applies the settings when `config` wants them and XLA's backend has not started."""
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        return False
    try:
        if not wanted(config):
            return False
    except Exception:  # a config the model cannot be built from: validation says why, later
        return False
    tuned = apply()
    if tuned:
        log.info("malloc keeps the train step's host buffers between steps (a large step on "
                 "the CPU; %s=0 turns this off)", ENV)
    return tuned
