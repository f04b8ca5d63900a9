"""The ADM UNet: guided-diffusion's outputs (vs an independent NumPy model), its parameter
count, initialisation, DTR / R-TR mask placement, and config refusals."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_adm as ref
from switch_dit_jax.models import build_model, convert, resolve_model_config
from switch_dit_jax.models.dtr import random_masks
from switch_dit_jax.models.unet import ResBlock

IMAGENET64 = dict(image_size=64, in_channels=3, model_channels=192, out_channels=6,
                  num_res_blocks=3, attention_resolutions=(32, 16, 8), channel_mult=(1, 2, 3, 4),
                  num_heads=4, num_head_channels=64, resblock_updown=True,
                  use_scale_shift_norm=True, use_new_attention_order=True, num_classes=1000)


def tiny_opts(**kw):
    o = dict(image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
             attention_resolutions=(4,), channel_mult=(1, 2), num_heads=2, num_head_channels=-1,
             resblock_updown=True, use_scale_shift_norm=True, use_new_attention_order=True,
             num_classes=5)
    o.update(kw)
    return o


def model_config(o, **kw):
    """This package's model config for guided-diffusion options `o`."""
    unet = {k: o[k] for k in ("model_channels", "channel_mult", "num_res_blocks",
                              "attention_resolutions", "num_heads", "num_head_channels",
                              "resblock_updown", "use_scale_shift_norm",
                              "use_new_attention_order")}
    return dict(dict(backbone="adm", name="ADM", input_size=o["image_size"],
                     in_channels=o["in_channels"], num_classes=o["num_classes"] or 1,
                     class_dropout_prob=0.0,
                     learn_sigma=o["out_channels"] == 2 * o["in_channels"], unet=unet), **kw)


def random_state_dict(o, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.2).astype(np.float32)
            for k, s in ref.state_dict_shapes(o).items()}


def dtr_mask_rows(t, channels, alpha=4.0, beta=0.8, num_tasks=1000):
    """DTR Pseudo Code 1, written out per row: a window of int(beta·C) ones."""
    active = int(beta * channels)
    rows = np.zeros((len(t), channels))
    for b, step in enumerate(t):
        start = int(np.round((channels - active) * (step / (num_tasks - 1)) ** alpha))
        rows[b, start:start + active] = 1
    return rows


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_params(model):
    s = model.input_size
    return nn.unbox(jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, s, s, model.in_channels)), jnp.zeros((1,)),
        jnp.zeros((1,), jnp.int32))))["params"]


def test_imagenet64_has_guided_diffusions_keys_shapes_and_parameter_count():
    shapes = ref.state_dict_shapes(IMAGENET64)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 295_904_454  # ADM's published count
    model = build_model(model_config(IMAGENET64))
    assert count(abstract_params(model)) == 295_904_454
    table = convert.adm_key_map(model)
    assert set(table) == set(shapes)
    expected = abstract_params(model)
    for key, rule in table.items():
        path, transform = rule.path, rule.transform
        view = np.broadcast_to(np.float32(0), shapes[key])  # shapes only, no memory
        want = expected
        for part in path:
            want = want[part]
        assert transform(view).shape == want.shape, key


@pytest.mark.parametrize("options", [
    dict(),  # ImageNet-64's options: new order, resblock_updown, AdaGN, class-conditional
    dict(use_new_attention_order=False, resblock_updown=False, use_scale_shift_norm=False,
         num_classes=None, num_head_channels=16, out_channels=3),
])
def test_import_gives_guided_diffusions_output(options):
    o = tiny_opts(**options)
    sd = random_state_dict(o)
    params = convert.from_adm_state_dict(sd, model_config(o))
    assert count(params) == sum(v.size for v in sd.values())
    model = build_model(model_config(o))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    t, y = np.array([3, 700]), np.array([1, 4])
    out = jax.jit(model.apply)({"params": params}, x, t, y if o["num_classes"] else None)
    want = ref.forward(sd, o, x.transpose(0, 3, 1, 2), t, y).transpose(0, 2, 3, 1)
    assert out.shape == (2, 8, 8, o["out_channels"])
    np.testing.assert_allclose(np.asarray(out), want, atol=5e-5 * np.abs(want).max())


@pytest.mark.parametrize("kind", ["dtr", "random"])
def test_routing_masks_sit_after_each_blocks_groupnorm(kind):
    """DTR / R-TR on ADM = guided-diffusion with the block's mask after its first GroupNorm
    (DTR Appendix A.1, Pseudo Code 2), a mask per input width, indexed by the timestep."""
    o = tiny_opts()
    sd = random_state_dict(o, seed=2)
    cfg = model_config(o, routing=dict(kind=kind))
    model = build_model(cfg)
    params = convert.from_adm_state_dict(sd, cfg)
    x = np.random.default_rng(3).standard_normal((2, 8, 8, 3)).astype(np.float32)
    t, y = np.array([0, 999]), np.array([0, 2])
    out = np.asarray(jax.jit(model.apply)({"params": params}, x, t, y))
    if kind == "dtr":
        masks = lambda c, block: dtr_mask_rows(t, c)  # noqa: E731
    else:  # each row has int(0.8·C) ones; which ones is R-TR's seeded draw, one table a block
        tables = {}

        def masks(c, block):
            table = tables.setdefault((c, block), random_masks(1000, c, 0.8, seed=0,
                                                               block=block))
            assert (table.sum(1) == int(0.8 * c)).all()
            return table[t]
    want = ref.forward(sd, o, x.transpose(0, 3, 1, 2), t, y, masks=masks).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(out, want, atol=5e-5 * np.abs(want).max())
    plain = ref.forward(sd, o, x.transpose(0, 3, 1, 2), t, y).transpose(0, 2, 3, 1)
    assert np.abs(out - plain).max() > 1e-2  # the masks do change the network


def test_dtr_with_beta_one_is_the_plain_adm():
    o = tiny_opts()
    sd = random_state_dict(o, seed=4)
    x = np.random.default_rng(5).standard_normal((2, 8, 8, 3)).astype(np.float32)
    outs = []
    for routing in (dict(kind="none"), dict(kind="dtr", beta=1.0)):
        cfg = model_config(o, routing=routing)
        params = convert.from_adm_state_dict(sd, cfg)
        outs.append(jax.jit(build_model(cfg).apply)({"params": params}, x, np.array([5, 900]),
                                                    np.array([1, 2])))
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("channels,out_channels", [(32, 32), (32, 64)])
def test_resblock_at_initialisation_is_its_skip_path(channels, out_channels):
    block = ResBlock(channels, out_channels, emb_channels=16, dropout=0.1)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, channels))
    emb = jax.random.normal(jax.random.PRNGKey(1), (2, 16))
    variables = jax.jit(block.init)(jax.random.PRNGKey(2), x, emb)
    out = jax.jit(lambda v: block.apply(v, x, emb, None, True,
                                        rngs={"dropout": jax.random.PRNGKey(3)}))(variables)
    if channels == out_channels:
        np.testing.assert_array_equal(out, x)
    else:  # a 1x1 convolution of x
        p = nn.unbox(variables)["params"]["skip_connection"]
        np.testing.assert_allclose(out, x @ p["kernel"][0, 0] + p["bias"], rtol=1e-5, atol=1e-6)


def small_config(num_classes=10, learn_sigma=True, **unet):
    return dict(backbone="adm", name="ADM", input_size=16, in_channels=1,
                num_classes=num_classes, learn_sigma=learn_sigma,
                unet=dict(dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                               attention_resolutions=(8,)), **unet))


@pytest.mark.parametrize("unet", [
    dict(),
    dict(resblock_updown=True, use_new_attention_order=True, num_head_channels=32,
         attention_resolutions=(16, 8), dropout=0.1, num_res_blocks=2),
    dict(use_scale_shift_norm=False, channel_mult=(1, 1, 2), attention_resolutions=()),
])
@pytest.mark.parametrize("num_classes,learn_sigma", [(1, False), (10, True)])
def test_output_shapes_and_label_table_of_every_option(unet, num_classes, learn_sigma):
    model = build_model(small_config(num_classes, learn_sigma, **unet))
    x = jnp.ones((2, 16, 16, 1))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.array([1, 2]),
                               jnp.array([0, 1]))
    out = jax.eval_shape(lambda v: model.apply(v, x, jnp.array([1, 2]), jnp.array([0, 1]),
                                               train=True,
                                               rngs={"dropout": jax.random.PRNGKey(1)}),
                         variables)
    assert out.shape == (2, 16, 16, 2 if learn_sigma else 1)
    table = nn.unbox(variables)["params"].get("label_emb", {}).get("embedding")
    assert (table is None) == (num_classes == 1)
    if table is not None:  # the null class of classifier-free guidance (label dropout 0.1)
        assert table.shape == (num_classes + 1, 128)


def test_output_is_zero_at_initialisation():
    """ADM zero-initialises its output convolution (and every block's last layer)."""
    model = build_model(small_config())
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 1))
    out = jax.jit(lambda k: model.apply(model.init(k, x, jnp.array([1, 2]), jnp.array([0, 1])),
                                        x, jnp.array([1, 2]), jnp.array([0, 1])))(
        jax.random.PRNGKey(0))
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("change,message", [
    (dict(name="DiT-B/2"), "model.name='DiT-B/2' with model.backbone='adm'"),
    (dict(unet=dict(model_channels=48)), "not a multiple of the 32 GroupNorm groups"),
    (dict(unet=dict(attention_resolutions=(3,))), "attention_resolutions has 3"),
    (dict(unet=dict(num_head_channels=80)), "num_head_channels=80 does not divide"),
    (dict(input_size=12), "input_size=12 cannot be halved 3 times"),
    (dict(input_size=16), "no default for model.input_size=16"),
    (dict(routing=dict(kind="switch")), "routing.kind='switch' is not defined for the ADM"),
    (dict(ffn=dict(kind="diffmoe")), "ffn.kind='diffmoe' needs the DiT backbone"),
    (dict(backbone="unet"), "model.backbone='unet'"),
])
def test_bad_adm_configs_are_refused_by_name(change, message):
    base = model_config(IMAGENET64)
    unet = dict(base["unet"], **change.pop("unet", {}))
    if change.get("input_size") == 16:
        unet["channel_mult"] = ()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        resolve_model_config(dict(base, unet=unet, **change))


def test_bad_state_dicts_are_refused_by_name():
    o = tiny_opts()
    sd, cfg = random_state_dict(o), model_config(o)
    renamed = dict(sd)
    renamed["input_blocks.1.0.in_layers.9.weight"] = renamed.pop(
        "input_blocks.1.0.in_layers.2.weight")
    with pytest.raises(ValueError, match=r"missing official key "
                                         r"'input_blocks\.1\.0\.in_layers\.2\.weight'"):
        convert.from_adm_state_dict(renamed, cfg)
    extra = dict(sd, **{"middle_block.3.norm.weight": sd["middle_block.1.norm.weight"]})
    with pytest.raises(ValueError, match=r"unexpected key 'middle_block\.3\.norm\.weight'"):
        convert.from_adm_state_dict(extra, cfg)
    bad = dict(sd, **{"output_blocks.0.1.qkv.weight": sd["output_blocks.0.1.qkv.weight"][:96]})
    with pytest.raises(ValueError, match=r"'output_blocks\.0\.1\.qkv\.weight' converts to "
                                         r"shape \(64, 96\)"):
        convert.from_adm_state_dict(bad, cfg)
    with pytest.raises(ValueError, match="class_dropout_prob=0.1 adds a null class"):
        convert.from_adm_state_dict(sd, dict(cfg, class_dropout_prob=0.1))
    with pytest.raises(ValueError, match="needs model.backbone='adm'"):
        convert.from_adm_state_dict(sd, dict(name="DiT-S/2"))
