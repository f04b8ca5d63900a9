"""benchmarks/gpu_suite.sh --smoke: the GPU suite's code paths on the CPU, with tiny models."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_suite_smoke_runs_every_part(tmp_path):
    out = tmp_path / "suite.json"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("XLA_FLAGS", None)  # one CPU device, as on one GPU
    run = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--smoke", f"--out={out}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    train = [r for r in rows if "per_device_batch" in r]
    assert [r["model"].split(" ")[0] for r in train] == ["DiT-XL/2", "DTR-XL/2",
                                                          "Switch-DiT-XL/2", "DiffMoE-L-E16"]
    for r in train:  # the simulated memory limit drops batch 16 for batch 8
        assert r["per_device_batch"] == 8 and "batch 16" in r["skipped_batches"][0]
        assert r["images_per_s"] > 0 and r["attention_impl"] == "xla"
    sampling = next(r for r in rows if r.get("model") == "DiT-XL/2 sampling")
    assert sampling["steps"] == 5 and sampling["images_per_s"] > 0
    checks = {r["check"]: r for r in rows if "check" in r}
    assert checks["bf16 vs f32 loss"]["ok"] and checks["bf16 vs f32 loss"]["relative_difference"] > 0
    assert checks["cuDNN vs XLA attention"]["ok"] and "GPU" in checks["cuDNN vs XLA attention"]["skipped"]
    assert "| DiffMoE-L-E16 (smoke: tiny) | 8 |" in run.stdout


def test_gpu_suite_names_a_missing_package_in_one_sentence(monkeypatch):
    import importlib.util
    import runpy

    import pytest
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ml_collections" else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(ROOT, "benchmarks", "gpu_suite.py"), run_name="__main__")
    message = str(exit_.value.code)
    assert message.startswith("gpu_suite: ml-collections not installed: pip install ml-collections")
    assert "\n" not in message
