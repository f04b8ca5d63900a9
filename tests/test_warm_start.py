"""Warm starts (train.init_from) from a checkpoint of this project or official DiT weights."""
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_dit
import test_train
from switch_dit_jax import parallel
from switch_dit_jax.data import pipeline
from switch_dit_jax.errors import UserError
from switch_dit_jax.models import build_model, convert
from switch_dit_jax.train.checkpoint import Checkpointer
from switch_dit_jax.train.state import create_train_state, make_optimizer, state_shardings
from switch_dit_jax.train.warm_start import warm_start

SWITCH = {"model.routing.kind": "switch", "model.routing.integration": "mask_skip_init"}


def fresh_state(config):
    model, tx = build_model(config.model), make_optimizer(config.train, config.loss)
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    _, shardings = state_shardings(model, tx, mesh, config.loss)
    return model, create_train_state(model, tx, jax.random.PRNGKey(7), mesh, config.loss), \
        shardings


def outputs(model, params):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
    return np.asarray(model.apply({"params": params}, x, jnp.asarray([0, 10, 500, 999]),
                                  jnp.asarray([1, 2, 3, 10])))


@pytest.fixture(scope="module")
def dit_workdir(tmp_path_factory):
    """A project checkpoint of a DiT whose weights are all non-zero (adaLN-Zero and the final
    layer start at zero: an untrained DiT would output zeros whatever is loaded)."""
    config = test_train.tiny_config()
    model, state, _ = fresh_state(config)
    leaves, tree = jax.tree.flatten(state.params)
    rng = np.random.default_rng(1)
    params = jax.tree.unflatten(tree, [p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype)
                                       for p in leaves])
    state = state.replace(params=params, ema_params=jax.tree.map(lambda p: 0.5 * p, params),
                          step=jnp.asarray(5, jnp.int32))
    workdir = str(tmp_path_factory.mktemp("dit"))
    loader = pipeline.make_train_loader(config.data, 16, 0, 1, seed=0)
    with Checkpointer(workdir, config, max_to_keep=1, async_save=False) as ckpt:
        ckpt.save(5, state, iter(loader), force=True)
    return workdir, model, jax.device_get(params)


def test_a_dit_checkpoint_starts_switch_dit_mask_skip_init_as_that_dit(dit_workdir, caplog):
    workdir, dit, dit_params = dit_workdir
    config = test_train.tiny_config(**SWITCH, **{"train.init_from": workdir})
    switch, state, shardings = fresh_state(config)
    init_routers = jax.device_get(state.params["routers_0"])
    with caplog.at_level(logging.INFO, logger="switch_dit_jax"):
        warm = jax.device_get(warm_start(state, config, shardings))
    assert int(warm.step) == 0 and int(warm.opt_state[0].count) == 0  # a fresh optimizer
    # The routers are new: they keep their own init (zero experts: the mask is 1), named.
    jax.tree.map(np.testing.assert_array_equal, warm.params["routers_0"], init_routers)
    message = next(r.getMessage() for r in caplog.records if "warm start" in r.getMessage())
    assert "routers_0/experts_kernel" in message and "routers_0/gate/kernel" in message
    np.testing.assert_array_equal(warm.params["blocks_0"]["attn"]["qkv"]["kernel"],
                                  dit_params["blocks_0"]["attn"]["qkv"]["kernel"])
    np.testing.assert_allclose(warm.ema_params["blocks_0"]["mlp"]["fc1"]["kernel"],
                               0.5 * dit_params["blocks_0"]["mlp"]["fc1"]["kernel"], rtol=1e-6)
    # (1 - m)·z + DiTBlock(m·z) with m = 1 is the DiT block: the same network at step 0.
    want = outputs(dit, dit_params)
    assert np.abs(want).mean() > 1e-2
    np.testing.assert_allclose(outputs(switch, warm.params), want, rtol=1e-5, atol=1e-6)


def test_a_mismatched_shape_is_refused_naming_the_parameter(dit_workdir):
    workdir, _, _ = dit_workdir
    config = test_train.tiny_config(**{"model.num_classes": 5, "train.init_from": workdir})
    _, state, shardings = fresh_state(config)
    with pytest.raises(UserError, match=r"parameter y_embedder/embedding_table has shape "
                                        r"\(11, 32\) in the checkpoint .* but \(6, 32\)"):
        warm_start(state, config, shardings)


def official_state_dict(params):
    """An official-layout state dict for the tiny DiT of `params` (arrays or shapes): torch
    Linear [out, in], conv OIHW."""
    shapes = {"pos_embed": (1, 4, 32)}
    for key, (path, _) in convert.official_key_map(1, 10).items():
        shape = functools.reduce(lambda node, part: node[part], path, params).shape
        if len(shape) == 4:  # HWIO -> OIHW
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif not key.endswith("embedding_table.weight"):  # a Linear: [in, out] -> [out, in]
            shape = shape[::-1]
        shapes[key] = shape
    return reference_dit.random_state_dict(shapes, seed=3)


def test_official_weights_warm_start_params_and_ema(tmp_path):
    config = test_train.tiny_config(**SWITCH)
    _, state, shardings = fresh_state(config)
    sd = official_state_dict(jax.device_get(state.params))
    path = str(tmp_path / "dit.npz")
    np.savez(path, **sd)
    config = test_train.tiny_config(**SWITCH, **{"train.init_from": path,
                                                 "train.init_ema": "params"})
    warm = jax.device_get(warm_start(state, config, shardings))
    for tree in (warm.params, warm.ema_params):
        np.testing.assert_array_equal(tree["blocks_0"]["mlp"]["fc1"]["kernel"],
                                      sd["blocks.0.mlp.fc1.weight"].T)
        np.testing.assert_array_equal(tree["y_embedder"]["embedding_table"],
                                      sd["y_embedder.embedding_table.weight"])


def test_openai_adm_weights_warm_start_a_cfg_dtr_unet(tmp_path):
    """An ADM state dict (no null class) into a class-conditional DTR UNet trained with label
    dropout: every ADM weight is taken, the null row keeps its initialisation."""
    import reference_adm as ref
    from test_unet import model_config, random_state_dict, tiny_opts
    o = tiny_opts()
    sd = random_state_dict(o, seed=7)
    path = str(tmp_path / "adm.npz")
    np.savez(path, **sd)
    config = test_train.tiny_config()
    for key, value in model_config(o, class_dropout_prob=0.1).items():
        if key == "unet":
            config.model.unet.update(value)
        else:
            setattr(config.model, key, value)
    config.model.routing.kind = "dtr"
    _, state, shardings = fresh_state(config)
    table = jax.device_get(state.params)["label_emb"]["embedding"]
    assert table.shape == (o["num_classes"] + 1, o["model_channels"] * 4)
    config.train.init_from, config.train.init_ema = path, "checkpoint"
    warm = jax.device_get(warm_start(state, config, shardings))
    np.testing.assert_array_equal(warm.params["label_emb"]["embedding"][:-1],
                                  sd["label_emb.weight"])
    np.testing.assert_array_equal(warm.params["label_emb"]["embedding"][-1], table[-1])
    np.testing.assert_array_equal(warm.ema_params["out_conv"]["kernel"],
                                  sd["out.2.weight"].transpose(2, 3, 1, 0))
    assert set(ref.state_dict_shapes(o)) == set(sd)


def test_openai_adm_checkpoint_becomes_a_workdir_that_samples(tmp_path):
    """import_official --family=adm: the EMA of step 5 is the converted ADM, and
    --mode=sample reads it like any checkpoint of this project."""
    from test_unet import model_config, random_state_dict, tiny_opts
    from switch_dit_jax.models import convert
    from switch_dit_jax.train import import_official, loop
    o = tiny_opts(in_channels=1, out_channels=2, num_classes=10, num_res_blocks=1)
    sd = random_state_dict(o, seed=3)
    path = str(tmp_path / "adm.npz")
    np.savez(path, **sd)
    config = test_train.tiny_config(**{"sample.cfg_scale": 1.0, "sample.num_steps": 4,
                                       "sample.num_samples": 10, "sample.batch_size": 10})
    for key, value in model_config(o).items():
        if key == "unet":
            config.model.unet.update(value)
        else:
            setattr(config.model, key, value)
    workdir = str(tmp_path / "run")
    assert import_official.import_to_workdir(config, workdir, "adm", path, step=5) == 5
    restored = test_train.restore_final(workdir, config)
    assert int(restored.step) == 5
    want = jax.device_get(convert.from_adm_state_dict(sd, config.model))
    np.testing.assert_array_equal(restored.ema_params["label_emb"]["embedding"],
                                  want["label_emb"]["embedding"])
    np.testing.assert_array_equal(restored.params["out_conv"]["kernel"],
                                  want["out_conv"]["kernel"])
    written = loop.sample_from_workdir(config, workdir)
    images = np.load(written["npz"])["arr_0"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
