"""Two settings for a large train step on the CPU, chosen before XLA's backend starts.

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

**oneDNN matmuls** (SWITCH_DIT_ONEDNN). jaxlib 0.10.2 to 0.12 ship XLA:CPU with oneDNN's
matmul kernels behind experimental options; their float32 GEMMs are faster than XLA's own on
DiT's shapes (2-core Xeon: 288 -> 321 GFLOP/s for [2048, 384] x [384, 1536]; DiT-S/2 train step
-5 %). XLA's oneDNN fusion, though, also builds kernels that oneDNN cannot compile as one
partition: two matmuls summed, or a matmul with elementwise work on its operands or beside its
output chain. oneDNN then fails ("partition compile failed") at the first execution and the
process dies of SIGILL, nothing a Python caller can catch. So the options are given to the
train step's compilation only (not to XLA_FLAGS), and `compile_step` reads the optimized HLO
before anything runs: a step with any oneDNN fusion other than one matmul with a chain of
elementwise post-ops on parameters is compiled again without them (and says so).

Both are applied only for a large step on the CPU: forward work of at least MIN_FORWARD_MACS
per step (DiT-S/2 gains from batch 4 on), and no accelerator plugin that could take the step
instead; oneDNN also only for the jaxlib releases checked to have its options, and never when
the user's XLA_FLAGS name oneDNN themselves. `main` applies the settings right after reading
the config. Each variable =0 never applies its setting, =1 always does.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
import warnings

MALLOC_ENV = "SWITCH_DIT_HOST_MALLOC"
ONEDNN_ENV = "SWITCH_DIT_ONEDNN"
MIN_FORWARD_MACS = 20e9  # per step: between DiT-S/2 at batch 2 (12 G, slower) and 4 (24 G, faster)
# DebugOptions of the train step's compilation; fusion type 1 is LIBRARY_FUSION_TYPE_DOT.
ONEDNN_OPTIONS = {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_fusion_type": 1}
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
    """{"malloc": ..., "onednn": ...}: each setting's variable if 0/1; else whether the step is
    large and on the CPU (see above)."""
    choices = {name: env.get(var, "").strip()
               for name, var in (("malloc", MALLOC_ENV), ("onednn", ONEDNN_ENV))}
    large = any(v not in ("0", "1") for v in choices.values()) and large_cpu_step(config, env)
    return {name: v == "1" if v in ("0", "1") else large for name, v in choices.items()}


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
    """Whether this jaxlib release is one checked to know ONEDNN_OPTIONS."""
    release = tuple(int(p) for p in re.findall(r"\d+", jaxlib_version)[:3])
    return ONEDNN_JAXLIB[0] <= release < ONEDNN_JAXLIB[1]


def onednn_possible(env=os.environ) -> bool:
    """Whether the train step may be given ONEDNN_OPTIONS: a jaxlib that knows them, and no
    oneDNN choice of the user's own in XLA_FLAGS."""
    return ("onednn" not in env.get("XLA_FLAGS", "")
            and onednn_known(importlib.metadata.version("jaxlib")))


_step_onednn = False  # set by for_config: compile_step tries ONEDNN_OPTIONS


def onednn_active(env=os.environ) -> bool:
    """Whether the train step's matmuls are meant to run with oneDNN in this process."""
    return _step_onednn or "--xla_cpu_use_onednn=true" in env.get("XLA_FLAGS", "").split()


_COMMUTATIVE = ("add", "multiply", "maximum", "minimum")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(([^)]*)\)")


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """Instruction lines of each named computation of an HLO module's text."""
    bodies, name = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
        if header:
            name = header.group(1)
            bodies[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None and line.strip():
            bodies[name].append(line)
    return bodies


def _one_partition(lines: list[str]) -> bool:
    """A fused computation oneDNN compiles as one partition: one matmul of two parameters, then
    a chain of elementwise ops, each on the previous one's result (its first operand, unless the
    op commutes) and parameters only."""
    leaves, chain = set(), []
    for line in lines:
        parsed = _INSTRUCTION.match(line)
        if parsed is None:
            return False
        name, op, operands = parsed.groups()
        if op == "parameter":
            leaves.add(name)
            continue
        names = re.findall(r"%([\w.\-]+)", operands)
        computed = [o for o in names if o not in leaves]
        if (op == "dot") != (not chain) or computed != chain[-1:]:
            return False
        if chain and op not in _COMMUTATIVE and names[0] != chain[-1]:
            return False  # oneDNN's post-ops take the chain as their first operand
        chain.append(name)
    return bool(chain) and lines[-1].lstrip().startswith("ROOT")


def unsafe_onednn_fusions(hlo_text: str) -> list[str]:
    """The oneDNN fusions of an optimized HLO module that oneDNN cannot compile (see above)."""
    bodies = _computations(hlo_text)
    called = [re.search(r"calls=%([\w.\-]+)", line) for line in hlo_text.splitlines()
              if "__onednn_fusion" in line and "calls=" in line]
    return [c.group(1) for c in called if not _one_partition(bodies.get(c.group(1), []))]


def compile_step(lowered):
    """The train step's executable, from `jax.jit(...).lower(...)`: with oneDNN matmuls when
    `for_config` chose them and XLA's fusion built only kernels oneDNN compiles (see above)."""
    if not _step_onednn:
        return lowered.compile()
    import jax
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = lowered.compile(compiler_options=ONEDNN_OPTIONS)
        for w in caught:
            if "persistent compilation cache" in str(w.message):
                # XLA cannot serialize oneDNN kernels ("ToProto is not implemented"): a warning
                # per start would only alarm; the step compiles anew after a restart instead.
                log.info("the compilation cache cannot hold a step with oneDNN kernels; it "
                         "is compiled again at each start")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except jax.errors.JaxRuntimeError as e:  # an XLA that no longer knows the options
        log.warning("XLA refused the oneDNN options (%s); the train step runs with XLA's own "
                    "matmuls", str(e).splitlines()[0])
        return lowered.compile()
    hlo_text = compiled.as_text()  # megabytes for a large step: read once
    unsafe = unsafe_onednn_fusions(hlo_text)
    if unsafe:
        log.warning("XLA's oneDNN fusion built %d kernel(s) that oneDNN cannot compile (%s); "
                    "the train step runs with XLA's own matmuls", len(unsafe), unsafe[0])
        return lowered.compile()
    log.info("the train step runs %d oneDNN matmul kernels", hlo_text.count('__onednn_fusion"'))
    return compiled


def lazily_compiled(jitted):
    """A jitted train step as the train loop calls it: `jitted` itself, or, when the step is
    to try oneDNN, compiled by `compile_step` at its first call."""
    if not _step_onednn:
        return jitted
    compiled = []

    def step(*args):
        if not compiled:
            compiled.append(compile_step(jitted.lower(*args)))
        return compiled[0](*args)
    return step


def for_config(config) -> set[str]:
    """Applies the settings `config` wants, if XLA's backend has not started; the applied ones."""
    global _step_onednn
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
        log.info("malloc keeps the train step's host buffers between steps (%s)",
                 _reason(MALLOC_ENV))
    if choices["onednn"] and onednn_possible():
        _step_onednn = True
        applied.add("onednn")
        log.info("the train step's matmuls run with oneDNN where XLA's oneDNN fusion allows "
                 "(%s)", _reason(ONEDNN_ENV))
    return applied


def _reason(var: str, env=os.environ) -> str:
    """Why a setting applies, for the log: the user's variable, or the step's size."""
    if env.get(var, "").strip() == "1":
        return f"{var}=1"
    return f"a large step on the CPU; {var}=0 turns this off"
