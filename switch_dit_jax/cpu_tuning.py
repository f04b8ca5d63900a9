"""Two settings for a large train step on the CPU, which must precede XLA's backend.

**malloc** (SWITCH_DIT_HOST_MALLOC). A compiled train step asks the host allocator for its
temporaries (0.9 GB for DiT-S/2 at batch 8) on every execution. The XLA threads that run it
each have a malloc arena of their own, whose heaps are capped at 64 MB, so glibc serves a block
that large with a fresh mmap and unmaps it on free: each step touches every page anew, ~300 k
minor page faults per step, 10 % of the DiT-S/2 step on a 2-core CPU. One arena for the whole
process, with no mmap and no trim threshold, keeps that memory in the heap from one step to the
next (malloc still mmaps when the heap cannot grow). The prices: the process keeps its peak
heap (DiT-S/2, batch 8: 2.9 GB resident instead of 2.0 GB), and every thread allocates from one
arena, which costs small steps more than they gain (the digits quickstart: 29 → 20 steps/s;
DiT-S/2 at batch 2: +3 %). The settings only reach threads that have not yet touched malloc.
Linux/glibc only.

**oneDNN matmuls** (SWITCH_DIT_ONEDNN=1, off unless asked for). jaxlib 0.10.2 to 0.12 ship
XLA:CPU with oneDNN's matmul kernels behind experimental flags; their float32 GEMMs are faster
than XLA's own on DiT's shapes (2-core Xeon: 288 -> 321 GFLOP/s for [2048, 384] x [384, 1536];
DiT-S/2 train step -5 %). But XLA's oneDNN fusion also builds kernels that oneDNN then fails to
compile ("partition compile failed"), and the process dies of SIGILL: a tiny DiT's train step
under jaxlib 0.10.2, a tiny Switch-DiT's under 0.12 as well. So the package never turns them on
by itself. XLA reads its flags once, when its backend starts, and aborts the process on a flag
it does not know: they are added to XLA_FLAGS only for the jaxlib releases checked to have them,
and never over a user's own oneDNN flags.

The malloc setting is applied only for a large step on the CPU: forward work of at least
MIN_FORWARD_MACS per step (DiT-S/2 gains from batch 4 on), and no accelerator plugin that could
take the step instead. `main` applies the settings right after reading the config. Each
variable =0 never applies its setting, =1 always does.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys

MALLOC_ENV = "SWITCH_DIT_HOST_MALLOC"
ONEDNN_ENV = "SWITCH_DIT_ONEDNN"
MIN_FORWARD_MACS = 20e9  # per step: between DiT-S/2 at batch 2 (12 G, slower) and 4 (24 G, faster)
ONEDNN_FLAGS = ("--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_fusion_type=dot")
ONEDNN_JAXLIB = ((0, 10, 2), (0, 13))  # [first, past the last) release checked to know both
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


def large_cpu_step(config, env=os.environ) -> bool:
    """Whether `config`'s train step on this machine is large and on the CPU (see above)."""
    if accelerator_possible(env):
        return False
    from switch_dit_jax.models import build_model, flops
    # "xla": the "auto" attention choice would ask the backend, which must not start yet.
    model = build_model(dict(config.model.to_dict(), attention_impl="xla"))
    per_image = flops.forward_macs_per_image(model)["total"]
    return per_image * config.train.global_batch_size >= MIN_FORWARD_MACS


def wanted(config, env=os.environ) -> dict[str, bool]:
    """{"malloc": ..., "onednn": ...}: each setting's variable if 0/1; else malloc for a large
    CPU step and no oneDNN (see above)."""
    choices = {name: env.get(var, "").strip()
               for name, var in (("malloc", MALLOC_ENV), ("onednn", ONEDNN_ENV))}
    onednn = choices["onednn"] == "1"
    malloc = choices["malloc"] == "1" if choices["malloc"] in ("0", "1") else \
        large_cpu_step(config, env)
    return {"malloc": malloc, "onednn": onednn}


def tune_malloc() -> bool:
    """The malloc settings above, now; True when glibc accepted all of them."""
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


def onednn_known(jaxlib_version: str) -> bool:
    """Whether this jaxlib release is one checked to know ONEDNN_FLAGS."""
    release = tuple(int(p) for p in re.findall(r"\d+", jaxlib_version)[:3])
    return ONEDNN_JAXLIB[0] <= release < ONEDNN_JAXLIB[1]


def use_onednn(env=os.environ) -> bool:
    """Adds ONEDNN_FLAGS to env["XLA_FLAGS"]; True when it did."""
    flags = env.get("XLA_FLAGS", "")
    if "onednn" in flags or not onednn_known(importlib.metadata.version("jaxlib")):
        return False
    env["XLA_FLAGS"] = " ".join([flags, *ONEDNN_FLAGS]).strip()
    return True


def onednn_active(env=os.environ) -> bool:
    """Whether XLA:CPU runs its matmuls with oneDNN in this process (flags as set above)."""
    flags = env.get("XLA_FLAGS", "").split()
    return all(f in flags for f in ONEDNN_FLAGS)


def for_config(config) -> set[str]:
    """Applies the settings `config` wants, if XLA's backend has not started; the applied ones."""
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        return set()
    try:
        choices = wanted(config)
    except Exception:  # a config the model cannot be built from: validation says why, later
        return set()
    applied = set()
    if choices["malloc"] and tune_malloc():
        applied.add("malloc")
        log.info("malloc keeps the train step's host buffers between steps (a large step on "
                 "the CPU; %s=0 turns this off)", MALLOC_ENV)
    if choices["onednn"] and use_onednn():
        applied.add("onednn")
        log.warning("XLA:CPU runs the matmuls with oneDNN (%s=1): experimental in XLA; a "
                    "process that dies with 'partition compile failed' needs it off", ONEDNN_ENV)
    return applied
