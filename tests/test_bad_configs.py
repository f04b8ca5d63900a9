"""Every bad config value is one sentence naming the field, raised before any compile.

In-process cases call `validate_config` (no training); a handful go through
`python -m switch_dit_jax.main` to check that the command line prints one `error:` line and
no traceback.
"""
import errno
import os
import subprocess
import sys
import tempfile

import ml_collections
import pytest

from switch_dit_jax import config_fields
from switch_dit_jax.config_base import get_base_config, load_config
from switch_dit_jax.errors import ConfigError
from switch_dit_jax.validation import check_workdir, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
LATENTS = {"data.name": "latents", "data.dir": "/data/latents", "model.in_channels": 4}
DTR = {"model.routing.kind": "dtr"}
FLOW = {"diffusion.objective": "flow", "sample.sampler": "euler"}
MOE = {"model.ffn.kind": "diffmoe", "model.ffn.num_experts": 4}


def bad_config(overrides):
    """The quickstart config with `overrides` set without ml_collections' type locks, so that
    values a config file could build (a string for a None field, a new field) can be tried."""
    config = ml_collections.ConfigDict(load_config(QUICKSTART).to_dict(), type_safe=False)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            if p not in node:
                node[p] = ml_collections.ConfigDict(type_safe=False)
            node = node[p]
        node[leaf] = value
    return config


def assert_one_sentence(message: str, *names: str) -> None:
    assert "\n" not in message and message.endswith("."), message
    assert message.count(". ") <= 1 or "e.g." in message, message  # one sentence, not a list
    for name in names:
        assert name in message, (name, message)


# (overrides, text the message must contain: the field), num_devices defaults to 8.
CASES = [
    # unknown fields and sections, named with the nearest known name
    ({"train.nonexistent_field": 1}, "'nonexistent_field'"),
    ({"optim.lr": 1}, "'optim'"),
    ({"model.routing.kindd": "dtr"}, "config.model.routing.kind"),
    ({"model.ffn.num_expert": 8}, "config.model.ffn.num_experts"),
    ({"trian.b1": 0.9}, "config.train"),
    ({"data.seeds": 1}, "config.data.seed"),
    ({"seeds": 1}, "config.seed"),
    ({"mesh.tensor": 2}, "'tensor'"),
    ({"eval.fid_every": 10}, "'fid_every'"),
    ({"model.mlp_ration": 4.0}, "config.model.mlp_ratio"),
    ({"sample.cfg": 2.0}, "'cfg'"),
    ({"vae.weight": "x"}, "config.vae.weights"),
    ({"seed": {"x": 1}}, "config.seed"),
    ({"model.routing": 3}, "config.model.routing"),
    ({"train.nonfinite": "explode"}, "config.train.nonfinite"),
    ({"train.remat_policy": "some"}, "config.train.remat_policy"),
    ({"train.profile_steps": "5-2"}, "config.train.profile_steps"),
    ({"train.profile_steps": 20}, "config.train.profile_steps"),
    ({"train.compilation_cache": None}, "config.train.compilation_cache"),
    # types (fields with a None default take anything from a config file)
    ({"model.depth": "4"}, "config.model.depth"),
    ({"model.hidden_size": 1.5}, "config.model.hidden_size"),
    ({"model.num_heads": True}, "config.model.num_heads"),
    ({"model.patch_size": 0}, "config.model.patch_size"),
    ({"model.mlp_ratio": "4"}, "config.model.mlp_ratio"),
    ({"model.learn_sigma": "yes"}, "config.model.learn_sigma"),
    ({"train.async_checkpointing": 1}, "config.train.async_checkpointing"),
    ({"data.hflip": None}, "config.data.hflip"),
    ({"data.dir": None}, "config.data.dir"),
    ({"sample.labels": 3}, "config.sample.labels"),
    ({"vae.block_out_channels": ()}, "config.vae.block_out_channels"),
    ({"vae.block_out_channels": (128, 0)}, "config.vae.block_out_channels"),
    ({"vae.block_out_channels": "128"}, "config.vae.block_out_channels"),
    ({"train.num_steps": 2.5}, "config.train.num_steps"),
    ({"train.learning_rate": "1e-4"}, "config.train.learning_rate"),
    # ranges: the cases first
    ({"model.mlp_ratio": 0.0}, "config.model.mlp_ratio"),
    ({"model.mlp_ratio": -1.0}, "config.model.mlp_ratio"),
    ({"loss.min_snr_gamma": -1.0}, "config.loss.min_snr_gamma"),
    ({"train.b1": 2.0}, "config.train.b1"),
    ({"train.eps": -1.0}, "config.train.eps"),
    ({"model.ffn.first": -3}, "config.model.ffn.first"),
    ({"seed": -1}, "config.seed"),
    ({"sample.eta": -1.0}, "config.sample.eta"),
    ({"eval.batch_size": 0}, "config.eval.batch_size"),
    ({"data.seed": -1}, "config.data.seed"),
    ({"seed": 2**32}, "config.seed"),
    ({"model.input_size": 0}, "config.model.input_size"),
    ({"model.in_channels": 0}, "config.model.in_channels"),
    ({"model.num_classes": 0}, "config.model.num_classes"),
    ({"model.class_dropout_prob": 1.0}, "config.model.class_dropout_prob"),
    ({"model.class_dropout_prob": -0.1}, "config.model.class_dropout_prob"),
    ({"model.mlp_ratio": float("nan")}, "config.model.mlp_ratio"),
    ({"model.mlp_ratio": 0.001}, "config.model.mlp_ratio"),
    ({"model.routing.num_tasks": 1}, "config.model.routing.num_tasks"),
    ({"model.routing.alpha": 0.0}, "config.model.routing.alpha"),
    ({"model.routing.beta": 0.0}, "config.model.routing.beta"),
    ({"model.routing.beta": 1.5}, "config.model.routing.beta"),
    ({"model.routing.seed": -1}, "config.model.routing.seed"),
    ({"model.routing.num_experts": 0}, "config.model.routing.num_experts"),
    ({"model.routing.top_k": 0}, "config.model.routing.top_k"),
    ({"model.ffn.num_experts": 0}, "config.model.ffn.num_experts"),
    ({"model.ffn.every": 0}, "config.model.ffn.every"),
    ({"model.ffn.capacity": 0.0}, "config.model.ffn.capacity"),
    ({"model.ffn.top_k": 0}, "config.model.ffn.top_k"),
    ({"model.ffn.threshold_decay": 1.0}, "config.model.ffn.threshold_decay"),
    ({"model.ffn.inference": "adaptive"}, "config.model.ffn.inference"),
    ({"model.ffn.interval_threshold": 1.5}, "config.model.ffn.interval_threshold"),
    ({"model.ffn.static_capacity": 0.0}, "config.model.ffn.static_capacity"),
    ({"model.ffn.shared_experts": -1}, "config.model.ffn.shared_experts"),
    ({"model.ffn.swiglu": 1}, "config.model.ffn.swiglu"),
    ({"model.routing.clusters": 0}, "config.model.routing.clusters"),
    ({"model.head_dim": 0}, "config.model.head_dim"),
    ({"diffusion.t_range": (500, 250)}, "config.diffusion.t_range"),
    ({"diffusion.t_range": (0, 2000)}, "config.diffusion.t_range"),
    ({"diffusion.t_range": (0, 250), **FLOW}, "config.diffusion.t_range"),
    ({"diffusion.objective": "vp"}, "config.diffusion.objective"),
    ({"diffusion.num_timesteps": 1}, "config.diffusion.num_timesteps"),
    ({"loss.min_snr_gamma": 0.0}, "config.loss.min_snr_gamma"),
    ({"loss.p2_gamma": -1.0}, "config.loss.p2_gamma"),
    ({"loss.p2_k": 0.0}, "config.loss.p2_k"),
    ({"loss.uw_clusters": 0}, "config.loss.uw_clusters"),
    ({"loss.uw_learning_rate": 0.0}, "config.loss.uw_learning_rate"),
    ({"loss.prior_weight": -1.0}, "config.loss.prior_weight"),
    ({"loss.load_balance_weight": -0.5}, "config.loss.load_balance_weight"),
    ({"loss.capacity_weight": -1.0}, "config.loss.capacity_weight"),
    ({"data.name": "cifar"}, "config.data.name"),
    ({"data.image_size": 0}, "config.data.image_size"),
    ({"data.latent_scale": 0.0}, "config.data.latent_scale"),
    ({"data.num_workers": -1}, "config.data.num_workers"),
    ({"vae.layers_per_block": 0}, "config.vae.layers_per_block"),
    ({"vae.norm_num_groups": 0}, "config.vae.norm_num_groups"),
    ({"vae.latent_channels": 0}, "config.vae.latent_channels"),
    ({"vae.batch_size": 0}, "config.vae.batch_size"),
    ({"train.global_batch_size": 0}, "config.train.global_batch_size"),
    ({"train.num_steps": -1}, "config.train.num_steps"),
    ({"train.learning_rate": 0.0}, "config.train.learning_rate"),
    ({"train.learning_rate": float("inf")}, "config.train.learning_rate"),
    ({"train.warmup_steps": -1}, "config.train.warmup_steps"),
    ({"train.weight_decay": -0.1}, "config.train.weight_decay"),
    ({"train.b1": -0.1}, "config.train.b1"),
    ({"train.b2": 1.0}, "config.train.b2"),
    ({"train.eps": 0.0}, "config.train.eps"),
    ({"train.grad_clip_norm": -1.0}, "config.train.grad_clip_norm"),
    ({"train.ema_decay": 1.5}, "config.train.ema_decay"),
    ({"train.log_every": 0}, "config.train.log_every"),
    ({"train.checkpoint_every": 0}, "config.train.checkpoint_every"),
    ({"train.keep_checkpoints": 0}, "config.train.keep_checkpoints"),
    ({"train.sample_every": -1}, "config.train.sample_every"),
    ({"sample.num_samples": 0}, "config.sample.num_samples"),
    ({"sample.batch_size": 0}, "config.sample.batch_size"),
    ({"sample.num_steps": 0}, "config.sample.num_steps"),
    ({"sample.eta": 2.0}, "config.sample.eta"),
    ({"sample.atol": 0.0}, "config.sample.atol"),
    ({"sample.rtol": -1.0}, "config.sample.rtol"),
    ({"sample.cfg_scale": -1.0}, "config.sample.cfg_scale"),
    ({"sample.seed": -1}, "config.sample.seed"),
    ({"eval.eval_every": -1}, "config.eval.eval_every"),
    ({"eval.num_samples": 0}, "config.eval.num_samples"),
    ({"mesh.data": 0}, "config.mesh.data"),
    ({"mesh.fsdp": -2}, "config.mesh.fsdp"),
    ({"mesh.expert": 0}, "config.mesh.expert"),
    # fields against each other
    ({"model.name": "DiT-Q/2"}, "model.name"),
    ({"model.patch_size": 3}, "model.patch_size"),
    ({"model.num_heads": 3}, "model.num_heads"),
    ({"model.hidden_size": 126, "model.num_heads": 2}, "model.hidden_size"),
    ({"model.compute_dtype": "float16"}, "model.compute_dtype"),
    ({"model.attention_impl": "flash"}, "model.attention_impl"),
    ({**DTR, **FLOW}, "config.model.routing.kind"),
    ({**DTR, "model.routing.num_tasks": 500}, "config.model.routing.num_tasks"),
    ({"model.routing.kind": "moe"}, "model.routing.kind"),
    ({"model.routing.top_k": 4}, "model.routing.top_k"),
    ({"model.routing.integration": "add"}, "model.routing.integration"),
    ({"model.routing.allocation": "random", "model.routing.num_experts": 4},
     "model.routing.allocation"),
    ({"model.ffn.kind": "dense"}, "model.ffn.kind"),
    ({"model.ffn.kind": "token_choice", "model.ffn.top_k": 20}, "model.ffn.top_k"),
    ({**MOE, "model.ffn.first": 4}, "config.model.ffn.first"),
    ({"diffusion.schedule": "sqrt"}, "config.diffusion.schedule"),
    ({"loss.weighting": "snr"}, "config.loss.weighting"),
    ({"loss.weighting": "min_snr", **FLOW}, "config.loss.weighting"),
    ({"loss.weighting": "ant_uw", "train.global_batch_size": 100}, "config.loss.uw_clusters"),
    ({"loss.weighting": "ant_uw", "loss.uw_clusters": 1024,
      "train.global_batch_size": 1024}, "config.loss.uw_clusters"),
    ({"data.name": "latents", "data.dir": ""}, "config.data.dir"),
    ({"model.input_size": 16}, "model.input_size"),
    ({"model.num_classes": 5}, "config.model.num_classes"),
    ({"sample.sampler": "euler"}, "config.sample.sampler"),
    ({**FLOW, "sample.sampler": "ddim"}, "config.sample.sampler"),
    ({"sample.num_steps": 2000}, "config.sample.num_steps"),
    ({"sample.labels": "3,12"}, "config.sample.labels"),
    ({"sample.labels": "a,b"}, "config.sample.labels"),
    ({**LATENTS, "eval.eval_every": 100}, "config.eval.reference_npz"),
    ({**LATENTS, "vae.weights": "/no/such/vae.safetensors"}, "config.vae.weights"),
    ({**LATENTS, "vae.weights": "/x.safetensors", "vae.norm_num_groups": 5},
     "norm_num_groups=5"),
    ({**LATENTS, "vae.weights": "/x.safetensors", "vae.latent_channels": 8},
     "config.vae.latent_channels"),
    ({"train.global_batch_size": 100}, "config.train.global_batch_size"),
    ({"mesh.fsdp": 3}, "config.mesh"),
    ({"mesh.data": 3}, "config.mesh"),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.expert": 4}, "config.mesh"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "config.mesh"),
    ({**MOE, "model.ffn.num_experts": 6, "mesh.expert": 4, "mesh.data": 2},
     "config.mesh.expert=4"),
    # the researcher's workbench: accumulation, bucket losses, W&B, warm starts
    ({"train.grad_accum_steps": 0}, "config.train.grad_accum_steps"),
    ({"train.grad_accum_steps": 3}, "train.grad_accum_steps=3"),  # 128 % (3 x 8 devices)
    ({"train.grad_accum_steps": 32}, "train.grad_accum_steps=32"),
    ({"loss.weighting": "ant_uw", "loss.uw_clusters": 16, "train.grad_accum_steps": 16}, "train.grad_accum_steps=16"),
    ({"train.loss_buckets": -1}, "config.train.loss_buckets"),
    ({"train.wandb_mode": "cloud"}, "config.train.wandb_mode"),
    ({"train.init_ema": "both"}, "config.train.init_ema"),
    ({"train.init_from": "/no/such/checkpoint"}, "config.train.init_from"),
]

# Mesh shapes against the parameters: (overrides, num_devices, process_count, field).
MESH_CASES = [
    ({"mesh.fsdp": 3, "train.global_batch_size": 126}, 6, 1, "config.mesh.fsdp=3"),
    ({"mesh.data": 1, "mesh.fsdp": -1, "train.global_batch_size": 126}, 6, 1,
     "config.mesh.fsdp=6"),
    ({"model.hidden_size": 96, "mesh.data": 1, "mesh.fsdp": 64,
      "train.global_batch_size": 128}, 64, 1, "config.mesh.fsdp=64"),
    ({**MOE, "model.ffn.num_experts": 4, "mesh.expert": 3, "train.global_batch_size": 126},
     3, 1, "config.mesh.expert=3"),
    ({"train.global_batch_size": 126}, 6, 4, "config.train.global_batch_size"),
    ({"train.global_batch_size": 130}, 8, 1, "config.train.global_batch_size"),
]


@pytest.mark.parametrize("overrides,field", CASES, ids=[repr(c[0])[:80] for c in CASES])
def test_bad_value_is_one_sentence_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        validate_config(bad_config(overrides), num_devices=8)
    assert_one_sentence(str(info.value), field)


@pytest.mark.parametrize("overrides,devices,processes,field", MESH_CASES,
                         ids=[f"{c[3]}-{c[1]}dev" for c in MESH_CASES])
def test_mesh_against_parameters(overrides, devices, processes, field):
    with pytest.raises(ConfigError) as info:
        validate_config(bad_config(overrides), num_devices=devices, process_count=processes)
    assert_one_sentence(str(info.value), field)


def test_a_fitting_mesh_passes():
    validate_config(bad_config({"mesh.data": 2, "mesh.fsdp": 4}), num_devices=8)
    validate_config(bad_config({**MOE, "mesh.data": 2, "mesh.expert": 4}), num_devices=8)


def test_cases_are_distinct_and_many():
    keys = [repr(sorted(c[0].items())) for c in CASES] + [
        repr((sorted(c[0].items()), c[1], c[2])) for c in MESH_CASES]
    assert len(set(keys)) == len(keys)
    assert len(keys) + len(WORKDIR_CASES) + 3 >= 100  # + load_config and batch cases


def test_every_base_field_has_a_rule():
    # A new field in config_base.py needs a rule in config_fields.FIELD_RULES (until it has
    # one, it is checked against its default's type only).
    missing = set(config_fields.flatten(get_base_config())) - set(config_fields.FIELD_RULES)
    assert not missing, sorted(missing)


def test_every_config_file_passes_the_field_checks():
    import glob
    for path in glob.glob(os.path.join(ROOT, "configs", "*.py")):
        config_fields.check_fields(load_config(path))


# ----------------------------------------------------------------------------- workdir, files

def _read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")


WORKDIR_CASES = ["file", "under_a_file", "read_only", "in_proc"]


@pytest.mark.parametrize("case", WORKDIR_CASES)
def test_bad_workdir(case, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    workdir = {"file": afile, "under_a_file": afile / "run", "read_only": tmp_path / "ro",
               "in_proc": "/proc/no_such_dir/run"}[case]
    if case == "read_only":  # root may write anywhere, so simulate the read-only mount
        (tmp_path / "ro").mkdir()
        monkeypatch.setattr(tempfile, "NamedTemporaryFile", _read_only)
    with pytest.raises(ConfigError) as info:
        check_workdir(str(workdir))
    assert_one_sentence(str(info.value), f"--workdir={workdir}")


def test_good_workdir_is_created(tmp_path):
    assert check_workdir(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    assert os.path.isdir(tmp_path / "a" / "b")
    assert not os.path.exists(check_workdir(str(tmp_path / "c"), create=False))


def test_load_config_names_the_file_and_the_field():
    with pytest.raises(FileNotFoundError, match="configs/nope.py"):
        load_config("configs/nope.py")
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, {"train.num_step": 3})
    assert_one_sentence(str(info.value), "'num_step'", "config.train.num_steps")


# ----------------------------------------------------------------------------- command line

def run_main(*args, env=None, **kw):
    cmd = [sys.executable, "-m", "switch_dit_jax.main", *args]
    env = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
                          **kw)


def assert_one_error_line(out, *names):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])


@pytest.mark.parametrize("args,name", [
    (["--config.train.nonexistent_field=1"], "'nonexistent_field'"),
    (["--config.optim.lr=1"], "'optim'"),
    (["--config.train.num_steps=abc"], "--config.train.num_steps=abc"),
    (["--config.model.mlp_ratio=0"], "config.model.mlp_ratio"),
], ids=["unknown_field", "unknown_section", "unparsable", "mlp_ratio"])
def test_command_line_errors_are_one_line(tmp_path, args, name):
    assert_one_error_line(run_main(f"--config={QUICKSTART}", f"--workdir={tmp_path}", *args),
                          name)


def test_missing_config_file_and_workdir_file(tmp_path):
    assert_one_error_line(run_main("--config=configs/nope.py", f"--workdir={tmp_path}"),
                          "configs/nope.py")
    (tmp_path / "afile").write_text("x")
    assert_one_error_line(run_main(f"--config={QUICKSTART}", f"--workdir={tmp_path}/afile"),
                          f"--workdir={tmp_path}/afile")


def test_mesh_error_on_six_devices(tmp_path):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=6", "JAX_PLATFORMS": "cpu"}
    args = [f"--config={QUICKSTART}", f"--workdir={tmp_path}", "--config.mesh.fsdp=3",
            "--config.train.global_batch_size=126"]
    assert_one_error_line(run_main(*args, env=env), "config.mesh.fsdp=3")


def test_verbose_keeps_the_traceback(tmp_path):
    out = run_main(f"--config={QUICKSTART}", f"--workdir={tmp_path}", "--verbose",
                   "--config.train.nonexistent_field=1")
    assert out.returncode != 0 and "Traceback" in out.stderr


TINY_RUN = ["--config.model.depth=1", "--config.model.hidden_size=32",
            "--config.model.num_heads=2", "--config.train.sample_every=0",
            "--config.train.global_batch_size=16", "--config.train.checkpoint_every=1"]


def test_batch_larger_than_the_data():
    from switch_dit_jax.data import pipeline
    with pytest.raises(ConfigError) as info:
        pipeline.make_train_loader(load_config(QUICKSTART).data, 4096)
    assert_one_sentence(str(info.value), "config.train.global_batch_size=4096")


def test_workers_changed_on_resume(tmp_path):
    base = [f"--config={QUICKSTART}", f"--workdir={tmp_path}", *TINY_RUN]
    first = run_main(*base, "--config.train.num_steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert_one_error_line(run_main(*base, "--config.train.num_steps=2",
                                   "--config.data.num_workers=1"), "data.num_workers")
