"""switch_dit_jax.host_malloc: for a large CPU step, XLA:CPU's temporary buffers are served,
step after step, from memory the process already touched instead of a fresh mmap each time;
small steps and accelerator hosts are left alone.

The effect is measured in fresh interpreters (the settings must precede XLA's backend), with
and without them, by the minor page faults of executions of a program whose 64 MiB temporary
is above glibc's largest dynamic mmap threshold (32 MiB).
"""
import os
import subprocess
import sys

import pytest

from switch_dit_jax import host_malloc
from switch_dit_jax.config_base import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))

CHILD = r"""
import sys
import switch_dit_jax.main  # the whole package, as `python -m switch_dit_jax.main` loads it
import resource
import jax
import jax.numpy as jnp
from switch_dit_jax import host_malloc
from switch_dit_jax.config_base import load_config

config = load_config(sys.argv[1], {"model.name": "DiT-S/2", "train.global_batch_size": 8})
tuned = host_malloc.for_config(config)

def program(x):
    y = jax.lax.optimization_barrier(jnp.sin(x))  # a temporary of x's size
    return jnp.sum(y * y)

x = jnp.ones(2**24, jnp.float32)
step = jax.jit(program).lower(x).compile()
assert step.memory_analysis().temp_size_in_bytes >= 2**26
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, *faults)
"""


def faults_per_execution(choice: str | None):
    env = {k: v for k, v in os.environ.items() if k != host_malloc.ENV}
    env["JAX_PLATFORMS"] = "cpu"
    if choice is not None:
        env[host_malloc.ENV] = choice
    out = subprocess.run([sys.executable, "-c", CHILD, os.path.join(ROOT, "configs", "dit_s.py")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    tuned, *faults = out.stdout.split()
    return tuned == "True", [int(f) for f in faults]


@pytest.mark.skipif(not GLIBC, reason="host_malloc tunes glibc's malloc; this is not glibc Linux")
def test_a_large_cpu_step_reuses_the_memory_of_earlier_temporaries():
    tuned, faults = faults_per_execution(None)
    assert tuned
    assert faults[0] > 10_000  # the first execution grows the heap by the 16 k-page temporary
    # Later ones reuse it, but for an occasional execution whose buffer is freed only after
    # the next one starts: the heap grows once more then.
    assert min(faults[1:]) < 50, faults


@pytest.mark.skipif(not GLIBC, reason="host_malloc tunes glibc's malloc; this is not glibc Linux")
def test_opted_out_each_execution_faults_its_temporary_in_anew():
    tuned, faults = faults_per_execution("0")
    assert not tuned
    assert min(faults) > 10_000, faults  # a fresh mmap per execution: the test above can fail


def config(name, **overrides):
    return load_config(os.path.join(ROOT, "configs", name), overrides)


CPU = {"JAX_PLATFORMS": "cpu"}


def test_only_large_steps_on_the_cpu_want_it():
    # Forward MACs per step against MIN_FORWARD_MACS = 20 G: DiT-S/2 is 6.06 G per image.
    dit_s = lambda b: config("dit_s.py", **{"model.name": "DiT-S/2",  # noqa: E731
                                            "train.global_batch_size": b})
    assert host_malloc.wanted(dit_s(4), CPU) and not host_malloc.wanted(dit_s(2), CPU)
    assert host_malloc.wanted(config("dit_b.py", **{"train.global_batch_size": 8}), CPU)
    assert not host_malloc.wanted(config("quickstart.py"), CPU)
    assert not host_malloc.wanted(config("quickstart_switchdit.py"), CPU)
    assert not host_malloc.wanted(dit_s(8), {"JAX_PLATFORMS": "cuda"})
    assert not host_malloc.wanted(dit_s(8), dict(CPU, SWITCH_DIT_HOST_MALLOC="0"))
    assert host_malloc.wanted(config("quickstart.py"), dict(CPU, SWITCH_DIT_HOST_MALLOC="1"))


def test_an_installed_accelerator_plugin_counts_as_an_accelerator(monkeypatch):
    class EntryPoint:
        name = "cuda"
    monkeypatch.setattr(host_malloc.importlib.metadata, "entry_points",
                        lambda group: [EntryPoint()] if group == "jax_plugins" else [])
    assert host_malloc.accelerator_possible({})
    assert not host_malloc.accelerator_possible(CPU)


def test_too_late_once_the_backend_runs():
    import jax
    jax.devices()
    assert not host_malloc.for_config(config("dit_b.py"))
