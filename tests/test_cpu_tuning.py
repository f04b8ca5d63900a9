"""switch_dit_jax.cpu_tuning: for a large CPU step, XLA:CPU's temporary buffers are served,
step after step, from memory the process already touched instead of a fresh mmap each time
(small steps and accelerator hosts are left alone); the train step's matmuls run with oneDNN,
unless XLA's oneDNN fusion built a kernel oneDNN cannot compile, which would kill the process.

The effects are measured in fresh interpreters (the settings must precede XLA's backend), with
and without them: the minor page faults of executions of a program whose 64 MiB temporary is
above glibc's largest dynamic mmap threshold (32 MiB), and which kernel the compiled matmul
calls, with its float32 result against float64.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
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
matmul = cpu_tuning.compile_step(jax.jit(lambda a, b: a @ b.T).lower(a, b))
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


def child_env(**choices):
    """This environment for a fresh CPU interpreter, the tuning variables only as `choices`."""
    env = {k: v for k, v in os.environ.items()
           if k not in (cpu_tuning.MALLOC_ENV, cpu_tuning.ONEDNN_ENV, "XLA_FLAGS")}
    return dict(env, JAX_PLATFORMS="cpu", **choices)


def child(**choices):
    """(applied settings, matmul kernel, its relative error, page faults per execution)."""
    out = subprocess.run([sys.executable, "-c", CHILD, os.path.join(ROOT, "configs", "dit_s.py")],
                         env=child_env(**choices), capture_output=True, text=True, timeout=180)
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


def test_a_large_cpu_step_runs_its_matmuls_with_onednn_in_float32_unless_told_not_to():
    import jaxlib
    if not cpu_tuning.onednn_known(jaxlib.__version__):
        pytest.fail(f"jaxlib {jaxlib.__version__} is outside ONEDNN_JAXLIB: check that it "
                    "knows ONEDNN_OPTIONS, then widen the range")
    applied, kernel, error, _ = child()
    assert "onednn" in applied and kernel == "onednn"
    assert error < 1e-5  # float32 products (bfloat16 ones would be ~1e-3 off)
    applied, kernel, error, _ = child(SWITCH_DIT_ONEDNN="0")
    assert "onednn" not in applied and kernel == "xla" and error < 1e-5
    applied, kernel, _, _ = child(XLA_FLAGS="--xla_cpu_use_onednn=false")  # the user's choice
    assert "onednn" not in applied and kernel == "xla"


# Programs whose oneDNN fusion oneDNN cannot compile, found in train steps: a process that runs
# one dies of SIGILL ("partition compile failed"), unless compile_step refuses the fusion.
GUARD_CHILD = r"""
import sys
import numpy as np
import jax
import jax.numpy as jnp
from switch_dit_jax import cpu_tuning
from switch_dit_jax.config_base import load_config

assert cpu_tuning.for_config(load_config(sys.argv[1])) == {"onednn"}
rng = np.random.default_rng(0)
g, x, y = (rng.standard_normal((64, 96)).astype(np.float32) for _ in range(3))
k = rng.standard_normal((96, 96)).astype(np.float32)
programs = {  # name: program, for jax and numpy (in float64) alike
    "two matmuls summed (a gradient of two uses)": lambda g, x, y, k, np: g @ k + x @ k,
    "elementwise work on an operand": lambda g, x, y, k, np: np.sin((x * y) @ k),
    "elementwise work beside the chain": lambda g, x, y, k, np: x * y + g * x + g @ k,
    "a matmul subtracted from something": lambda g, x, y, k, np: x - np.tanh(g @ k) * 2.0,
    "one matmul and its post-ops": lambda g, x, y, k, np: np.tanh(g @ k + 1.0) * 2.0,
}
for name, program in programs.items():
    compiled = cpu_tuning.compile_step(jax.jit(lambda *a: program(*a, jnp)).lower(g, x, y, k))
    kernel = "onednn" if "__onednn_fusion" in compiled.as_text() else "xla"
    exact = program(*(a.astype(np.float64) for a in (g, x, y, k)), np)
    error = np.abs(np.asarray(compiled(g, x, y, k)) - exact).max() / np.abs(exact).max()
    print(f"{name}|{kernel}|{error:.2e}", flush=True)
"""


def test_kernels_onednn_cannot_compile_are_left_to_xla_instead_of_killing_the_process():
    import jaxlib
    if not cpu_tuning.onednn_known(jaxlib.__version__):
        pytest.fail(f"jaxlib {jaxlib.__version__} is outside ONEDNN_JAXLIB")
    env = child_env(SWITCH_DIT_ONEDNN="1", SWITCH_DIT_HOST_MALLOC="0")
    out = subprocess.run([sys.executable, "-c", GUARD_CHILD,
                          os.path.join(ROOT, "configs", "quickstart.py")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    results = {line.split("|")[0]: line.split("|")[1:] for line in out.stdout.splitlines()}
    assert len(results) == 5, out.stdout
    for name, (kernel, error) in results.items():
        assert float(error) < 1e-4, name  # float32 round-off; bfloat16 would be ~1e-2
    # (XLA releases differ in which of the others they fuse for oneDNN; none may crash.)
    assert results["one matmul and its post-ops"][0] == "onednn"


def test_onednn_fusions_that_are_one_partition():
    # Fused computations as XLA prints them (shapes shortened): one matmul of parameters, then
    # a chain of elementwise ops on its result and parameters, is the only accepted shape.
    def module(*body):
        return "\n".join(["%fused_computation.1 (p0: f32[8,4]) -> f32[8,4] {", *body, "}",
                          "ENTRY %main.1 () -> f32[8,4] {",
                          '  ROOT %f = f32[8,4]{1,0} fusion(%a, %b), kind=kCustom, '
                          'calls=%fused_computation.1, backend_config={"fusion_config":'
                          '{"kind":"__onednn_fusion"}}', "}"])
    params = ["  %p0 = f32[8,4]{1,0} parameter(0)", "  %p1 = f32[4,4]{1,0} parameter(1)",
              "  %p2 = f32[8,4]{1,0} parameter(2)"]
    dot = "  %d = f32[8,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}"
    assert cpu_tuning.unsafe_onednn_fusions(module(*params, dot.replace("  %d", "  ROOT %d"))) == []
    chain = [dot, "  %a = f32[8,4]{1,0} add(%d, %p2)", "  ROOT %m = f32[8,4]{1,0} multiply(%a, %p2)"]
    assert cpu_tuning.unsafe_onednn_fusions(module(*params, *chain)) == []
    two_dots = [dot, dot.replace("%d", "%e"), "  ROOT %s = f32[8,4]{1,0} add(%d, %e)"]
    beside = ["  %x = f32[8,4]{1,0} multiply(%p2, %p2)", dot, "  ROOT %s = f32[8,4]{1,0} add(%x, %d)"]
    on_operand = ["  %x = f32[8,4]{1,0} multiply(%p0, %p2)", dot.replace("(%p0", "(%x").replace(
        "  %d", "  ROOT %d")]
    branching = [dot, "  %a = f32[8,4]{1,0} add(%d, %p2)", "  ROOT %m = f32[8,4]{1,0} multiply(%a, %d)"]
    subtracted = [dot, "  ROOT %s = f32[8,4]{1,0} subtract(%p2, %d)"]
    assert cpu_tuning.unsafe_onednn_fusions(module(*params, dot, subtracted[1].replace(
        "(%p2, %d)", "(%d, %p2)"))) == []
    for body in (two_dots, beside, on_operand, branching, subtracted):
        assert cpu_tuning.unsafe_onednn_fusions(module(*params, *body)) == ["fused_computation.1"]


@pytest.mark.parametrize("version,known", [("0.10.2", True), ("0.11.2", True), ("0.12.0.1", True),
                                           ("0.10.1", False), ("0.13.0", False), ("1.0", False)])
def test_onednn_only_for_jaxlib_releases_checked_to_know_it(version, known):
    # Another XLA refuses options it does not know; the step would be compiled twice.
    assert cpu_tuning.onednn_known(version) == known


def config(name, **overrides):
    return load_config(os.path.join(ROOT, "configs", name), overrides)


CPU = {"JAX_PLATFORMS": "cpu"}


def test_only_large_steps_on_the_cpu_want_it():
    # Forward MACs per step against MIN_FORWARD_MACS = 20 G: DiT-S/2 is 6.06 G per image.
    dit_s = lambda b: config("dit_s.py", **{"model.name": "DiT-S/2",  # noqa: E731
                                            "train.global_batch_size": b})
    both, neither = {"malloc": True, "onednn": True}, {"malloc": False, "onednn": False}
    assert cpu_tuning.wanted(dit_s(4), CPU) == both
    assert cpu_tuning.wanted(dit_s(2), CPU) == neither
    assert cpu_tuning.wanted(config("dit_b.py", **{"train.global_batch_size": 8}), CPU) == both
    assert cpu_tuning.wanted(config("quickstart.py"), CPU) == neither
    assert cpu_tuning.wanted(config("quickstart_switchdit.py"), CPU) == neither
    assert cpu_tuning.wanted(dit_s(8), {"JAX_PLATFORMS": "cuda"}) == neither
    assert cpu_tuning.wanted(dit_s(8), dict(CPU, SWITCH_DIT_HOST_MALLOC="0")) == \
        {"malloc": False, "onednn": True}
    assert cpu_tuning.wanted(dit_s(8), dict(CPU, SWITCH_DIT_ONEDNN="0")) == \
        {"malloc": True, "onednn": False}
    assert cpu_tuning.wanted(config("quickstart.py"), dict(CPU, SWITCH_DIT_ONEDNN="1")) == \
        {"malloc": False, "onednn": True}


def test_the_log_names_the_variable_that_forced_a_setting():
    var = cpu_tuning.ONEDNN_ENV
    assert cpu_tuning._reason(var, {var: "1"}) == "SWITCH_DIT_ONEDNN=1"
    assert cpu_tuning._reason(var, {}) == \
        "a large step on the CPU; SWITCH_DIT_ONEDNN=0 turns this off"


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


FAMILIES_CHILD = r"""
import json, sys
import numpy as np
import flax.linen as nn
import jax
sys.path.insert(0, sys.argv[1])
from synthetic_step import synthetic_step
from switch_dit_jax import cpu_tuning, parallel
from switch_dit_jax.config_base import load_config

for path, overrides in json.loads(sys.argv[2]):
    config = load_config(path, dict(overrides, **{"train.global_batch_size": 8}))
    fn, state, data, key, mesh, _ = synthetic_step(config)  # the first applies SWITCH_DIT_ONEDNN
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        step = cpu_tuning.lazily_compiled(fn)
        for _ in range(2):
            state, metrics = step(state, data, key)
    print(path, overrides, cpu_tuning.onednn_active(), float(metrics["loss"]), flush=True)
"""


def test_every_family_trains_with_onednn_asked_for():
    # Each family's tiny train step, two steps in one process that asked for oneDNN: XLA fuses
    # each differently, and a kernel oneDNN cannot compile would kill the process.
    cfg = lambda name: os.path.join(ROOT, "configs", name)  # noqa: E731
    moe = {"model.ffn.num_experts": 4}
    families = [(cfg("quickstart.py"), {}), (cfg("quickstart_dtr.py"), {}),
                (cfg("quickstart_switchdit.py"), {}), (cfg("quickstart_diffmoe.py"), {}),
                (cfg("quickstart.py"), dict(moe, **{"model.ffn.kind": "token_choice",
                                                    "model.ffn.top_k": 1})),
                (cfg("quickstart.py"), dict(moe, **{"model.ffn.kind": "expert_choice"})),
                (cfg("quickstart_adm.py"), {})]
    env = child_env(SWITCH_DIT_ONEDNN="1", SWITCH_DIT_HOST_MALLOC="0")
    out = subprocess.run([sys.executable, "-c", FAMILIES_CHILD, os.path.join(ROOT, "benchmarks"),
                          json.dumps(families)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert len(lines) == len(families), out.stdout
    for line in lines:
        assert " True " in line and np.isfinite(float(line.split()[-1])), line


def test_main_trains_with_onednn_like_without_it(tmp_path):
    # The train loop compiles its step through compile_step: the tiny Switch-DiT (routers, prior
    # loss) keeps oneDNN's matmuls, and its losses are XLA's to float32 round-off.
    def run(onednn):
        workdir = tmp_path / f"onednn{onednn}"
        env = child_env(SWITCH_DIT_ONEDNN=onednn, SWITCH_DIT_HOST_MALLOC="0")
        overrides = {"model.depth": 2, "model.hidden_size": 64, "model.num_heads": 2,
                     "train.global_batch_size": 16, "train.num_steps": 4, "train.log_every": 1,
                     "train.checkpoint_every": 4, "train.sample_every": 0, "eval.eval_every": 0}
        out = subprocess.run([sys.executable, "-m", "switch_dit_jax.main",
                              f"--config={os.path.join(ROOT, 'configs', 'quickstart_switchdit.py')}",
                              f"--workdir={workdir}",
                              *(f"--config.{k}={v}" for k, v in overrides.items())],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        return out.stderr, [r["loss"] for r in rows if "loss" in r]

    log, with_onednn = run("1")
    assert re.search(r"the train step runs [1-9]\d* oneDNN matmul kernels", log), log[-2000:]
    assert "Error writing persistent compilation cache" not in log  # XLA cannot; said in one line
    log, without = run("0")
    assert "oneDNN" not in log
    assert len(with_onednn) == len(without) == 4
    np.testing.assert_allclose(with_onednn, without, rtol=1e-4)
