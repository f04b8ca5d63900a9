"""switch_dit_jax.cpu_tuning: for a large CPU step, XLA:CPU's temporary buffers are served,
step after step, from memory the process already touched instead of a fresh mmap each time
(small steps and accelerator hosts are left alone); XLA:CPU's matmuls run with oneDNN only
when SWITCH_DIT_ONEDNN=1 asks for it.

The effects are measured in fresh interpreters (the settings must precede XLA's backend), with
and without them: the minor page faults of executions of a program whose 64 MiB temporary is
above glibc's largest dynamic mmap threshold (32 MiB), and which kernel the compiled matmul
calls, with its float32 result against float64.
"""
import os
import subprocess
import sys

import pytest

from switch_dit_jax import cpu_tuning
from switch_dit_jax.config_base import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))

CHILD = r"""
import sys
import switch_dit_jax.main  # the whole package, as `python -m switch_dit_jax.main` loads it
import resource
import numpy as np
import jax
import jax.numpy as jnp
from switch_dit_jax import cpu_tuning
from switch_dit_jax.config_base import load_config

config = load_config(sys.argv[1], {"model.name": "DiT-S/2", "train.global_batch_size": 8})
applied = cpu_tuning.for_config(config)

a, b = (np.random.default_rng(i).standard_normal((256, 384)).astype(np.float32) for i in (0, 1))
matmul = jax.jit(lambda a, b: a @ b.T).lower(a, b).compile()
kernel = "onednn" if "onednn_fusion" in matmul.as_text() else "xla"
exact = a.astype(np.float64) @ b.astype(np.float64).T
error = float(np.abs(np.asarray(matmul(a, b)) - exact).max() / np.abs(exact).max())

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
print(",".join(sorted(applied)) or "-", kernel, error, *faults)
"""


def child(**choices):
    """(applied settings, matmul kernel, its relative error, page faults per execution)."""
    env = {k: v for k, v in os.environ.items()
           if k not in (cpu_tuning.MALLOC_ENV, cpu_tuning.ONEDNN_ENV, "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", **choices)
    out = subprocess.run([sys.executable, "-c", CHILD, os.path.join(ROOT, "configs", "dit_s.py")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, kernel, error, *faults = out.stdout.split()
    return set(applied.split(",")) - {"-"}, kernel, float(error), [int(f) for f in faults]


@pytest.mark.skipif(not GLIBC, reason="cpu_tuning tunes glibc's malloc; this is not glibc Linux")
def test_a_large_cpu_step_reuses_the_memory_of_earlier_temporaries():
    applied, _, _, faults = child()
    assert "malloc" in applied
    assert faults[0] > 10_000  # the first execution grows the heap by the 16 k-page temporary
    # Later ones reuse it, but for an occasional execution whose buffer is freed only after
    # the next one starts: the heap grows once more then.
    assert min(faults[1:]) < 50, faults


@pytest.mark.skipif(not GLIBC, reason="cpu_tuning tunes glibc's malloc; this is not glibc Linux")
def test_opted_out_each_execution_faults_its_temporary_in_anew():
    applied, _, _, faults = child(SWITCH_DIT_HOST_MALLOC="0")
    assert "malloc" not in applied
    assert min(faults) > 10_000, faults  # a fresh mmap per execution: the test above can fail


def test_onednn_matmuls_only_when_asked_for_and_in_float32():
    import jaxlib
    if not cpu_tuning.onednn_known(jaxlib.__version__):
        pytest.fail(f"jaxlib {jaxlib.__version__} is outside ONEDNN_JAXLIB: check that it "
                    "knows ONEDNN_FLAGS, then widen the range")
    applied, kernel, error, _ = child(SWITCH_DIT_ONEDNN="1")
    assert "onednn" in applied and kernel == "onednn"
    assert error < 1e-5  # float32 products (bfloat16 ones would be ~1e-3 off)
    applied, kernel, error, _ = child()  # a large step, but oneDNN is not asked for
    assert "onednn" not in applied and kernel == "xla" and error < 1e-5


def test_onednn_flags_join_a_users_xla_flags_but_never_replace_their_own():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert cpu_tuning.use_onednn(env) and cpu_tuning.onednn_active(env)
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8",
                                        *cpu_tuning.ONEDNN_FLAGS]
    theirs = {"XLA_FLAGS": "--xla_cpu_use_onednn=false"}
    assert not cpu_tuning.use_onednn(theirs) and not cpu_tuning.onednn_active(theirs)
    assert theirs == {"XLA_FLAGS": "--xla_cpu_use_onednn=false"}
    empty = {}
    assert cpu_tuning.use_onednn(empty) and empty["XLA_FLAGS"] == " ".join(cpu_tuning.ONEDNN_FLAGS)


@pytest.mark.parametrize("version,known", [("0.10.2", True), ("0.11.2", True), ("0.12.0.1", True),
                                           ("0.10.1", False), ("0.13.0", False), ("1.0", False)])
def test_onednn_flags_only_for_jaxlib_releases_checked_to_know_them(version, known):
    # An XLA that does not know a flag in XLA_FLAGS aborts the process at backend start.
    assert cpu_tuning.onednn_known(version) == known


def config(name, **overrides):
    return load_config(os.path.join(ROOT, "configs", name), overrides)


CPU = {"JAX_PLATFORMS": "cpu"}


def test_only_large_steps_on_the_cpu_want_it():
    # Forward MACs per step against MIN_FORWARD_MACS = 20 G: DiT-S/2 is 6.06 G per image.
    dit_s = lambda b: config("dit_s.py", **{"model.name": "DiT-S/2",  # noqa: E731
                                            "train.global_batch_size": b})
    both, neither = {"malloc": True, "onednn": False}, {"malloc": False, "onednn": False}
    assert cpu_tuning.wanted(dit_s(4), CPU) == both
    assert cpu_tuning.wanted(dit_s(2), CPU) == neither
    assert cpu_tuning.wanted(config("dit_b.py", **{"train.global_batch_size": 8}), CPU) == both
    assert cpu_tuning.wanted(config("quickstart.py"), CPU) == neither
    assert cpu_tuning.wanted(config("quickstart_switchdit.py"), CPU) == neither
    assert cpu_tuning.wanted(dit_s(8), {"JAX_PLATFORMS": "cuda"}) == neither
    assert cpu_tuning.wanted(dit_s(8), dict(CPU, SWITCH_DIT_HOST_MALLOC="0")) == neither
    assert cpu_tuning.wanted(config("quickstart.py"), dict(CPU, SWITCH_DIT_ONEDNN="1")) == \
        {"malloc": False, "onednn": True}


def test_an_installed_accelerator_plugin_counts_as_an_accelerator(monkeypatch):
    class EntryPoint:
        name = "cuda"
    monkeypatch.setattr(cpu_tuning.importlib.metadata, "entry_points",
                        lambda group: [EntryPoint()] if group == "jax_plugins" else [])
    assert cpu_tuning.accelerator_possible({})
    assert not cpu_tuning.accelerator_possible(CPU)


def test_too_late_once_the_backend_runs():
    import jax
    jax.devices()
    assert cpu_tuning.for_config(config("dit_b.py")) == set()
