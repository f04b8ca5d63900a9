"""The SD VAE: diffusers tensor layout, safetensors round trip, NCHW reference, shapes, errors."""
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from switch_dit_jax import vae as vae_lib
from switch_dit_jax.vae import VAEWeightsError, build_autoencoder

TINY = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=4,
            latent_channels=4)

# A representative part of the real SD VAE's diffusers layout (PyTorch shapes), one entry of
# every kind of tensor; the whole table is also pinned by the tensor and parameter counts.
SD_TENSORS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.conv_in.bias": (128,),
    "encoder.down_blocks.0.resnets.0.norm1.weight": (128,),
    "encoder.down_blocks.0.resnets.0.conv1.weight": (128, 128, 3, 3),
    "encoder.down_blocks.0.resnets.1.norm2.bias": (128,),
    "encoder.down_blocks.0.downsamplers.0.conv.weight": (128, 128, 3, 3),
    "encoder.down_blocks.1.resnets.0.conv1.weight": (256, 128, 3, 3),
    "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
    "encoder.down_blocks.2.resnets.0.conv_shortcut.weight": (512, 256, 1, 1),
    "encoder.down_blocks.2.downsamplers.0.conv.bias": (512,),
    "encoder.down_blocks.3.resnets.1.conv2.weight": (512, 512, 3, 3),
    "encoder.mid_block.resnets.0.conv1.weight": (512, 512, 3, 3),
    "encoder.mid_block.attentions.0.group_norm.weight": (512,),
    "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
    "encoder.mid_block.attentions.0.to_k.bias": (512,),
    "encoder.mid_block.attentions.0.to_v.weight": (512, 512),
    "encoder.mid_block.attentions.0.to_out.0.weight": (512, 512),
    "encoder.mid_block.resnets.1.norm2.weight": (512,),
    "encoder.conv_norm_out.weight": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.mid_block.attentions.0.to_out.0.bias": (512,),
    "decoder.up_blocks.0.resnets.2.conv2.weight": (512, 512, 3, 3),
    "decoder.up_blocks.0.upsamplers.0.conv.weight": (512, 512, 3, 3),
    "decoder.up_blocks.1.upsamplers.0.conv.bias": (512,),
    "decoder.up_blocks.2.resnets.0.conv1.weight": (256, 512, 3, 3),
    "decoder.up_blocks.2.resnets.0.conv_shortcut.weight": (256, 512, 1, 1),
    "decoder.up_blocks.2.upsamplers.0.conv.weight": (256, 256, 3, 3),
    "decoder.up_blocks.3.resnets.0.conv_shortcut.weight": (128, 256, 1, 1),
    "decoder.up_blocks.3.resnets.2.norm1.weight": (128,),
    "decoder.conv_norm_out.bias": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
SD_TENSOR_COUNT = 248
SD_PARAM_COUNT = 83_653_863


def analytic_counts(ch=(128, 256, 512, 512), layers=2, latent=4):
    """(tensors, parameters) of the architecture written out by hand, independent of Flax."""
    conv = lambda i, o, k: (2, i * o * k * k + o)  # noqa: E731
    norm = lambda c: (2, 2 * c)  # noqa: E731
    add = lambda *parts: tuple(map(sum, zip(*parts)))  # noqa: E731

    def res(i, o):
        parts = [norm(i), conv(i, o, 3), norm(o), conv(o, o, 3)]
        return add(*parts, *([conv(i, o, 1)] if i != o else []))

    def mid(c):
        return add(res(c, c), norm(c), *[conv(c, c, 1)] * 4, res(c, c))  # q, k, v, out: c·c + c

    def blocks(widths, n):
        total, prev = (0, 0), widths[0]
        for i, c in enumerate(widths):
            for j in range(n):
                total, prev = add(total, res(prev, c)), c
            if i < len(widths) - 1:
                total = add(total, conv(c, c, 3))
        return total

    enc = add(conv(3, ch[0], 3), blocks(ch, layers), mid(ch[-1]), norm(ch[-1]),
              conv(ch[-1], 2 * latent, 3), conv(2 * latent, 2 * latent, 1))
    dec = add(conv(latent, latent, 1), conv(latent, ch[-1], 3), mid(ch[-1]),
              blocks(ch[::-1], layers + 1), norm(ch[0]), conv(ch[0], 3, 3))
    return add(enc, dec)


def test_sd_layout_names_shapes_and_counts():
    expected = vae_lib.expected_tensors(build_autoencoder())  # eval_shape only
    for name, shape in SD_TENSORS.items():
        assert expected.get(name) == shape, name
    assert len(expected) == SD_TENSOR_COUNT
    assert sum(int(np.prod(s)) for s in expected.values()) == SD_PARAM_COUNT
    assert analytic_counts() == (SD_TENSOR_COUNT, SD_PARAM_COUNT)


@pytest.mark.parametrize("size,latent", [((256, 256), (32, 32)), ((512, 384), (64, 48)),
                                         ((64, 128), (8, 16))])
def test_encode_decode_shapes_at_sd_size(size, latent):
    model = build_autoencoder()
    params = vae_lib.abstract_params(model)
    x = jax.ShapeDtypeStruct((2, *size, 3), np.float32)
    mean, std = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method="encode"),
                               params, x)
    assert mean.shape == std.shape == (2, *latent, 4)
    z = jax.ShapeDtypeStruct((2, *latent, 4), np.float32)
    out = jax.eval_shape(lambda p, z: model.apply({"params": p}, z, method="decode"), params, z)
    assert out.shape == (2, *size, 3)


_APPLY = {}


def apply(model, params, x, method):
    """One compiled function per (model, method, input shape) for the whole test module."""
    key = (model, method, x.shape)
    if key not in _APPLY:
        _APPLY[key] = jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))
    return jax.device_get(_APPLY[key](params, x))


@pytest.fixture(scope="module")
def tiny():
    model = build_autoencoder(**TINY)
    params = vae_lib.numpy_params(model)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    return model, params, x


@pytest.mark.parametrize("legacy", [False, True])
def test_safetensors_round_trip_is_exact(tiny, tmp_path, legacy):
    model, params, x = tiny
    path = vae_lib.save_diffusers(params, str(tmp_path / "vae.safetensors"),
                                  legacy_attention_names=legacy)
    tensors = load_file(path)
    expected = vae_lib.expected_tensors(model)
    names = {vae_lib.convert.legacy_name(n) if legacy else n for n in expected}
    assert set(tensors) == names
    assert ("encoder.mid_block.attentions.0.query.weight" in tensors) == legacy
    loaded_model, loaded = vae_lib.load_vae(path, **TINY)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    for method, inp in (("encode", x), ("decode", x[:, :2, :3, :1].repeat(4, -1))):
        a, b = apply(model, params, inp, method), apply(loaded_model, loaded, inp, method)
        jax.tree.map(np.testing.assert_array_equal, a, b)


# ---------------------------------------------------------------- NCHW reference from the file


def _conv(x, w, b, stride=1, pad=None):
    k = w.shape[2]
    p = (k // 2,) * 4 if pad is None else pad  # (top, bottom, left, right)
    x = np.pad(x, ((0, 0), (0, 0), p[:2], p[2:]))
    h, wd = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], h, wd))
    for i in range(k):
        for j in range(k):
            patch = x[:, :, i:i + stride * h:stride, j:j + stride * wd:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + b[None, :, None, None]


def _gn(x, g, b, groups):
    y = x.reshape(x.shape[0], groups, -1)
    y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-6)
    return y.reshape(x.shape) * g[None, :, None, None] + b[None, :, None, None]


def _silu(x):
    return x / (1 + np.exp(-x))


class Reference:
    """diffusers AutoencoderKL forward in NCHW float64, straight from the PyTorch-layout file."""

    def __init__(self, tensors, groups):
        self.t = {k: v.astype(np.float64) for k, v in tensors.items()}
        self.g = groups

    def conv(self, x, name, **kw):
        return _conv(x, self.t[name + ".weight"], self.t[name + ".bias"], **kw)

    def norm(self, x, name):
        return _gn(x, self.t[name + ".weight"], self.t[name + ".bias"], self.g)

    def resnet(self, x, name):
        h = self.conv(_silu(self.norm(x, name + ".norm1")), name + ".conv1")
        h = self.conv(_silu(self.norm(h, name + ".norm2")), name + ".conv2")
        if name + ".conv_shortcut.weight" in self.t:
            x = self.conv(x, name + ".conv_shortcut")
        return x + h

    def attention(self, x, name):
        n, c, hh, ww = x.shape
        h = self.norm(x, name + ".group_norm").reshape(n, c, -1).transpose(0, 2, 1)
        lin = lambda v, s: v @ self.t[f"{name}.{s}.weight"].T + self.t[f"{name}.{s}.bias"]  # noqa
        q, k, v = lin(h, "to_q"), lin(h, "to_k"), lin(h, "to_v")
        s = q @ k.transpose(0, 2, 1) / np.sqrt(c)
        s = np.exp(s - s.max(-1, keepdims=True))
        o = lin((s / s.sum(-1, keepdims=True)) @ v, "to_out.0")
        return x + o.transpose(0, 2, 1).reshape(n, c, hh, ww)

    def mid(self, x, name):
        x = self.resnet(x, name + ".resnets.0")
        return self.resnet(self.attention(x, name + ".attentions.0"), name + ".resnets.1")

    def blocks(self, x, kind, sampler):
        i = 0
        while f"{kind}.{i}.resnets.0.conv1.weight" in self.t:
            j = 0
            while f"{kind}.{i}.resnets.{j}.conv1.weight" in self.t:
                x, j = self.resnet(x, f"{kind}.{i}.resnets.{j}"), j + 1
            if f"{kind}.{i}.{sampler}.0.conv.weight" in self.t:
                name = f"{kind}.{i}.{sampler}.0.conv"
                if sampler == "downsamplers":
                    x = self.conv(x, name, stride=2, pad=(0, 1, 0, 1))
                else:
                    x = self.conv(x.repeat(2, axis=2).repeat(2, axis=3), name)
            i += 1
        return x

    def encode(self, x):
        x = self.blocks(self.conv(x, "encoder.conv_in"), "encoder.down_blocks", "downsamplers")
        x = self.mid(x, "encoder.mid_block")
        x = self.conv(_silu(self.norm(x, "encoder.conv_norm_out")), "encoder.conv_out")
        mean, logvar = np.split(self.conv(x, "quant_conv"), 2, axis=1)
        return mean, np.exp(0.5 * np.clip(logvar, -30, 20))

    def decode(self, z):
        x = self.conv(self.conv(z, "post_quant_conv"), "decoder.conv_in")
        x = self.blocks(self.mid(x, "decoder.mid_block"), "decoder.up_blocks", "upsamplers")
        return self.conv(_silu(self.norm(x, "decoder.conv_norm_out")), "decoder.conv_out")


def test_flax_vae_matches_nchw_reference_of_the_file(tiny, tmp_path):
    """Catches layout slips a self round trip cannot: OIHW order, pad side, moment order."""
    model, params, x = tiny
    path = vae_lib.save_diffusers(params, str(tmp_path / "vae.safetensors"))
    ref = Reference(load_file(path), TINY["norm_num_groups"])
    loaded_model, loaded = vae_lib.load_vae(path, **TINY)
    to_nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
    mean, std = apply(loaded_model, loaded, x, "encode")
    ref_mean, ref_std = ref.encode(to_nchw(x))
    np.testing.assert_allclose(to_nchw(mean), ref_mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_nchw(std), ref_std, rtol=1e-4, atol=1e-4)
    out = apply(loaded_model, loaded, np.asarray(mean), "decode")
    np.testing.assert_allclose(to_nchw(out), ref.decode(ref_mean), rtol=1e-4, atol=1e-4)


def test_ldm_style_1x1_conv_attention_projections_load(tiny, tmp_path):
    model, params, _ = tiny
    path = vae_lib.save_diffusers(params, str(tmp_path / "vae.safetensors"),
                                  legacy_attention_names=True)
    tensors = load_file(path)
    tensors = {k: (v[:, :, None, None] if ".attentions.0." in k and v.ndim == 2 else v)
               for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "conv.safetensors"))
    _, loaded = vae_lib.load_vae(str(tmp_path / "conv.safetensors"), **TINY)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_weight_errors_name_the_tensor(tiny, tmp_path):
    model, params, _ = tiny
    tensors = load_file(vae_lib.save_diffusers(params, str(tmp_path / "vae.safetensors")))
    name = "decoder.up_blocks.1.resnets.2.conv1.weight"

    def write(d):
        save_file(d, str(tmp_path / "bad.safetensors"))
        return str(tmp_path / "bad.safetensors")

    with pytest.raises(VAEWeightsError, match=f"no tensor '{name}'"):
        vae_lib.load_vae(write({k: v for k, v in tensors.items() if k != name}), **TINY)
    with pytest.raises(VAEWeightsError, match=f"tensor '{name}' .* shape \\(16, 16, 1, 1\\)"):
        vae_lib.load_vae(write(dict(tensors, **{name: np.zeros((16, 16, 1, 1), np.float32)})),
                         **TINY)
    with pytest.raises(VAEWeightsError, match="first 'encoder.extra'"):
        vae_lib.load_vae(write(dict(tensors, **{"encoder.extra": np.zeros(1, np.float32)})),
                         **TINY)
    with pytest.raises(VAEWeightsError, match="has shape .* needs .*set the vae"):
        vae_lib.load_vae(str(tmp_path / "vae.safetensors"))  # the SD architecture
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vae_lib.load_vae(str(tmp_path / "missing.safetensors"), **TINY)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(VAEWeightsError, match="not a readable safetensors file"):
        vae_lib.load_vae(str(tmp_path / "junk.safetensors"), **TINY)
    with pytest.raises(ValueError, match="norm_num_groups=5"):
        build_autoencoder((8, 16), norm_num_groups=5)
