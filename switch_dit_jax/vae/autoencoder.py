"""The Stable Diffusion KL autoencoder (diffusers `AutoencoderKL`, SD 1.x VAE) in Flax linen, NHWC.

Images are in [-1, 1]; latents are the *unscaled* VAE latents (multiply by 0.18215 for the
diffusion model). Module names mirror the diffusers checkpoint layout (`down_blocks_0`,
`resnets_1`, `to_out_0`, ...) so that `convert.py` maps every tensor by name alone.

Architecture facts (diffusers `models/autoencoders/vae.py`, `resnet.py`, `downsampling.py`,
`upsampling.py`, `attention_processor.py`; the same network as ldm's `Encoder`/`Decoder`):
  * encoder: conv_in 3x3 -> per width a DownEncoderBlock2D of `layers_per_block` resnets and,
    except for the last, a stride-2 3x3 conv after a (0, 1, 0, 1) zero pad -> mid block
    (resnet, single-head self-attention, resnet) -> GroupNorm, SiLU, conv_out 3x3 to 2·latent
    channels -> quant_conv 1x1; the moments split into mean and log-variance (clipped to
    [-30, 20]).
  * decoder: post_quant_conv 1x1 -> conv_in 3x3 -> mid block -> per reversed width an
    UpDecoderBlock2D of `layers_per_block + 1` resnets and, except for the last, nearest 2x
    upsampling then a 3x3 conv -> GroupNorm, SiLU, conv_out 3x3.
  * resnet: GroupNorm, SiLU, conv 3x3, GroupNorm, SiLU, conv 3x3, plus the input (through a 1x1
    conv_shortcut when the width changes). GroupNorm eps is 1e-6 everywhere.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SD_BLOCK_OUT_CHANNELS = (128, 256, 512, 512)
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


def _norm(groups: int, name: str) -> nn.GroupNorm:
    # Two-pass variance: the one-pass E[x^2]-E[x]^2 form drifts from PyTorch's GroupNorm on the
    # large activations of the 512-wide blocks.
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, name=name)


def _conv(features: int, kernel: int, name: str, stride: int = 1, padding="SAME_TORCH"):
    pad = kernel // 2 if padding == "SAME_TORCH" else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, name=name)


class ResnetBlock(nn.Module):
    out_channels: int
    groups: int

    @nn.compact
    def __call__(self, x):
        h = _conv(self.out_channels, 3, "conv1")(nn.silu(_norm(self.groups, "norm1")(x)))
        h = _conv(self.out_channels, 3, "conv2")(nn.silu(_norm(self.groups, "norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H·W positions, with a residual connection."""

    groups: int

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = _norm(self.groups, "group_norm")(x).reshape(b, h * w, 1, c)
        q, k, v = (nn.Dense(c, name=n)(y) for n in ("to_q", "to_k", "to_v"))
        # Softmax in float32 whatever the input dtype, as diffusers' upcast_softmax does.
        out = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                           v.astype(jnp.float32)).astype(x.dtype)
        out = nn.Dense(c, name="to_out_0")(out.reshape(b, h * w, c))
        return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
    channels: int
    groups: int

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock(self.channels, self.groups, name="resnets_0")(x)
        x = AttentionBlock(self.groups, name="attentions_0")(x)
        return ResnetBlock(self.channels, self.groups, name="resnets_1")(x)


class Downsample(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x):
        # PyTorch convs pad symmetrically, so the reference pads right/bottom by one by hand and
        # convolves unpadded; the same here keeps odd-sized maps on the reference's grid.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour 2x
        return _conv(self.channels, 3, "conv")(x)


class DownEncoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample(self.out_channels, name="downsamplers_0")(x)
        return x


class UpDecoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample(self.out_channels, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    out_channels: int  # 2 · latent channels: mean and log-variance

    @nn.compact
    def __call__(self, x):
        widths = tuple(self.block_out_channels)
        x = _conv(widths[0], 3, "conv_in")(x)
        for i, width in enumerate(widths):
            x = DownEncoderBlock(width, self.layers_per_block, self.groups,
                                 add_downsample=i < len(widths) - 1, name=f"down_blocks_{i}")(x)
        x = MidBlock(widths[-1], self.groups, name="mid_block")(x)
        x = nn.silu(_norm(self.groups, "conv_norm_out")(x))
        return _conv(self.out_channels, 3, "conv_out")(x)


class Decoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    out_channels: int

    @nn.compact
    def __call__(self, z):
        widths = tuple(reversed(tuple(self.block_out_channels)))
        x = _conv(widths[0], 3, "conv_in")(z)
        x = MidBlock(widths[0], self.groups, name="mid_block")(x)
        for i, width in enumerate(widths):
            x = UpDecoderBlock(width, self.layers_per_block + 1, self.groups,
                               add_upsample=i < len(widths) - 1, name=f"up_blocks_{i}")(x)
        x = nn.silu(_norm(self.groups, "conv_norm_out")(x))
        return _conv(self.out_channels, 3, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """`encode(images) -> (mean, std)` of the latent posterior; `decode(latents) -> images`.

    Downsampling factor 2**(len(block_out_channels) - 1): 8 for the SD VAE.
    """

    block_out_channels: Sequence[int] = SD_BLOCK_OUT_CHANNELS
    layers_per_block: int = 2
    norm_num_groups: int = 32
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3

    def setup(self):
        widths = tuple(self.block_out_channels)
        self.encoder = Encoder(widths, self.layers_per_block, self.norm_num_groups,
                               2 * self.latent_channels)
        self.quant_conv = _conv(2 * self.latent_channels, 1, "quant_conv")
        self.post_quant_conv = _conv(self.latent_channels, 1, "post_quant_conv")
        self.decoder = Decoder(widths, self.layers_per_block, self.norm_num_groups,
                               self.out_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(tuple(self.block_out_channels)) - 1)

    def encode(self, images):
        moments = self.quant_conv(self.encoder(images))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.exp(0.5 * jnp.clip(logvar, *LOGVAR_RANGE))

    def decode(self, latents):
        return self.decoder(self.post_quant_conv(latents))

    def __call__(self, images):
        """Reconstruction from the posterior mean; used to create every parameter at init."""
        mean, _ = self.encode(images)
        return self.decode(mean)


def check_architecture(block_out_channels, layers_per_block, norm_num_groups,
                       latent_channels) -> None:
    """One clear error for a VAE shape that cannot be built (raised before any tracing)."""
    widths = tuple(block_out_channels)
    if not widths or any(not isinstance(w, int) or w <= 0 for w in widths):
        raise ValueError(f"vae.block_out_channels={widths!r} must be a non-empty tuple of positive "
                         "integers, e.g. (128, 256, 512, 512) for the SD VAE.")
    if (not isinstance(norm_num_groups, int) or norm_num_groups <= 0
            or any(w % norm_num_groups for w in widths)):
        raise ValueError(f"vae.norm_num_groups={norm_num_groups!r} must be a positive integer that "
                         f"divides every width of vae.block_out_channels={widths} (32 for SD).")
    if not isinstance(layers_per_block, int) or layers_per_block <= 0:
        raise ValueError(f"vae.layers_per_block={layers_per_block!r} must be a positive integer "
                         "(2 for the SD VAE).")
    if not isinstance(latent_channels, int) or latent_channels <= 0:
        raise ValueError(f"vae.latent_channels={latent_channels!r} must be a positive integer "
                         "(4 for the SD VAE).")


def build_autoencoder(block_out_channels=SD_BLOCK_OUT_CHANNELS, layers_per_block: int = 2,
                      norm_num_groups: int = 32, latent_channels: int = 4) -> AutoencoderKL:
    widths = tuple(int(w) for w in block_out_channels)
    check_architecture(widths, layers_per_block, norm_num_groups, latent_channels)
    return AutoencoderKL(block_out_channels=widths, layers_per_block=layers_per_block,
                         norm_num_groups=norm_num_groups, latent_channels=latent_channels)


def init_params(model: AutoencoderKL, key):
    """Random parameters; the spatial size of the init input does not change their shapes."""
    side = model.downsample_factor
    x = jnp.zeros((1, side, side, model.in_channels))
    return jax.jit(lambda k: model.init(k, x)["params"])(key)  # eager init dispatches op by op


def numpy_params(model: AutoencoderKL, seed: int = 0):
    """Random parameters drawn with NumPy: kernels N(0, 1/fan_in), norm scales near 1, biases
    near 0. For tests and smoke runs: tracing `init` unrolls one PRNG computation per tensor,
    which XLA on CPU takes close to a minute to compile even for a tiny VAE."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, fan_in ** -0.5, leaf.shape).astype(np.float32)
        return ((name == "scale") + rng.normal(0.0, 0.1, leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(model))


def abstract_params(model: AutoencoderKL):
    """Parameter shapes (ShapeDtypeStructs) without allocating them."""
    return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
