"""The ADM UNet (Dhariwal & Nichol 2021, openai/guided-diffusion `unet.py`) in Flax, NHWC.

The second backbone next to the DiT (DTR Table 1, right half): same call
`apply(variables, x [B, H, W, C], t [B], y [B], train)` and the same outputs (eps, and the
variance interpolation with learn_sigma), so nothing outside `models/` asks which one runs.

Structure, initialisation and numerics follow guided-diffusion: GroupNorm(32) in float32,
torch-default (uniform ±1/√fan_in) init, zero-initialised output convolution of every ResBlock,
of every attention block and of the model, AdaGN ("scale-shift norm"), optional ResBlock
up/down-sampling, both attention orders. `unet_layout` is the one description of which layer
sits where; the model and the checkpoint import (`convert.from_adm_state_dict`) both read it.

DTR / R-TR (DTR Appendix A.1, Pseudo Code 2): in every ResBlock and attention block the
per-timestep channel mask multiplies the activations right after the block's first GroupNorm;
the skip path sees the unmasked input. A block gets the mask of its own (input) channel count.
"""
from __future__ import annotations


import dataclasses
import itertools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from switch_dit_jax.models import attention, layers
from switch_dit_jax.models.dtr import dtr_masks, random_mask_rows

NORM_GROUPS = 32
# guided-diffusion's `create_model` channel multipliers by image size.
DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4),
                        128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
REMAT_POLICIES = {"none": None, "full": None,
                  "dots_saveable": jax.checkpoint_policies.dots_saveable}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer of a UNet stage. kind: "conv" (the stem), "res", "attn", "down", "up"."""
    kind: str
    channels: int
    out_channels: int
    updown: str = ""      # "res" only: "", "up" or "down" (resblock_updown)
    num_heads: int = 0    # "attn" only


@dataclasses.dataclass(frozen=True)
class Layout:
    """input_blocks[i][j] / middle_block[j] / output_blocks[i][j]: guided-diffusion's indices."""
    input_blocks: tuple[tuple[Layer, ...], ...]
    middle_block: tuple[Layer, ...]
    output_blocks: tuple[tuple[Layer, ...], ...]
    out_channels_of_torso: int


def _heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    if num_head_channels == -1:
        return num_heads
    return channels // num_head_channels


def unet_layout(image_size: int, in_channels: int, model_channels: int,
                channel_mult: Sequence[float], num_res_blocks: int,
                attention_resolutions: Sequence[int], num_heads: int = 1,
                num_head_channels: int = -1, resblock_updown: bool = False) -> Layout:
    """Every layer of guided-diffusion's UNetModel, in its module order.

    `attention_resolutions` are feature-map sizes in pixels (guided-diffusion's flag, e.g.
    32,16,8 for the 64x64 model), converted to downsample factors as its `create_model` does.
    """
    attention_ds = {image_size // r for r in attention_resolutions}

    def attn(ch):
        return Layer("attn", ch, ch, num_heads=_heads(ch, num_heads, num_head_channels))

    ch = int(channel_mult[0] * model_channels)
    inputs = [(Layer("conv", in_channels, ch),)]
    skip_channels, ds = [ch], 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            out = int(mult * model_channels)
            block = [Layer("res", ch, out)]
            ch = out
            if ds in attention_ds:
                block.append(attn(ch))
            inputs.append(tuple(block))
            skip_channels.append(ch)
        if level != len(channel_mult) - 1:
            inputs.append((Layer("res", ch, ch, updown="down") if resblock_updown
                           else Layer("down", ch, ch),))
            skip_channels.append(ch)
            ds *= 2
    middle = (Layer("res", ch, ch), attn(ch), Layer("res", ch, ch))
    outputs = []
    for level, mult in list(enumerate(channel_mult))[::-1]:
        for i in range(num_res_blocks + 1):
            out = int(mult * model_channels)
            block = [Layer("res", ch + skip_channels.pop(), out)]
            ch = out
            if ds in attention_ds:
                block.append(attn(ch))
            if level and i == num_res_blocks:
                block.append(Layer("res", ch, ch, updown="up") if resblock_updown
                             else Layer("up", ch, ch))
                ds //= 2
            outputs.append(tuple(block))
    return Layout(tuple(inputs), middle, tuple(outputs), ch)


# ----------------------------------------------------------------------------- layers


def _torch_uniform(fan_in: int):
    """torch's default Linear/Conv init for weights and biases: U(-1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype,
                                                                     -bound, bound)


def conv(features: int, in_features: int, names: tuple, dtype, kernel: int = 3,
         stride: int = 1, zero: bool = False, name: str | None = None) -> nn.Conv:
    init = layers.zeros if zero else _torch_uniform(in_features * kernel * kernel)
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=layers.logical(init, (None, None) + names),
                   bias_init=layers.logical(init, names[1:]), name=name)


def dense(features: int, in_features: int, names: tuple, dtype, zero: bool = False,
          name: str | None = None) -> layers.Dense:
    init = layers.zeros if zero else _torch_uniform(in_features)
    return layers.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                        kernel_init=layers.logical(init, names),
                        bias_init=layers.logical(init, names[1:]), name=name)


def group_norm(name: str) -> nn.GroupNorm:
    """GroupNorm(32) with torch's eps, in float32 whatever the compute dtype (ADM's
    GroupNorm32)."""
    return nn.GroupNorm(num_groups=NORM_GROUPS, epsilon=1e-5, dtype=jnp.float32,
                        param_dtype=jnp.float32, use_fast_variance=False,
                        scale_init=layers.logical(nn.initializers.ones_init(), (None,)),
                        bias_init=layers.logical(layers.zeros, (None,)), name=name)


def _conv_apply(module, x, dtype):
    return module(x.astype(dtype)).astype(jnp.float32)


def upsample(x):
    """Nearest-neighbour x2 (torch F.interpolate(scale_factor=2, mode='nearest'))."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResBlock(nn.Module):
    """GN -> SiLU -> [up/down] -> conv -> (+emb | AdaGN) -> GN -> SiLU -> dropout -> zero conv,
    plus the skip (identity, or a 1x1 conv when the width changes)."""
    channels: int
    out_channels: int
    emb_channels: int
    updown: str = ""
    use_scale_shift_norm: bool = True
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb, mask=None, train: bool = False):
        c, out = self.channels, self.out_channels
        h = group_norm("in_norm")(x)
        if mask is not None:  # DTR: right after the GroupNorm (SiLU(0) = 0, so before SiLU)
            h = h * mask
        h = nn.silu(h)
        if self.updown == "up":
            h, x = upsample(h), upsample(x)
        elif self.updown == "down":
            h, x = avg_pool(h), avg_pool(x)
        h = _conv_apply(conv(out, c, ("conv_in", "embed"), self.dtype, name="in_conv"), h,
                        self.dtype)
        emb_out = dense(2 * out if self.use_scale_shift_norm else out, self.emb_channels,
                        ("embed", "mlp"), self.dtype, name="emb_proj")(
            nn.silu(emb).astype(self.dtype)).astype(jnp.float32)[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = group_norm("out_norm")(h) * (1 + scale) + shift
        else:
            h = group_norm("out_norm")(h + emb_out)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv_apply(conv(out, out, ("conv_in", "embed"), self.dtype, zero=True,
                             name="out_conv"), h, self.dtype)
        if out != c:
            x = _conv_apply(conv(out, c, ("conv_in", "embed"), self.dtype, kernel=1,
                                 name="skip_connection"), x, self.dtype)
        return x + h


class AttentionBlock(nn.Module):
    """x + proj_out(attention(qkv(GN(x)))) over the H·W positions; proj_out starts at zero.

    The qkv kernel keeps guided-diffusion's output-channel order, so imported weights need no
    permutation: [q | k | v] × heads with `new_order` (QKVAttention), heads × [q | k | v]
    otherwise (QKVAttentionLegacy).
    """
    channels: int
    num_heads: int
    new_order: bool = False
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, mask=None):
        b, hgt, wid, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        h = group_norm("norm")(x)
        if mask is not None:  # DTR: right after the GroupNorm
            h = h * mask
        qkv = dense(3 * c, c, ("embed", "qkv"), self.dtype, name="qkv")(
            h.reshape(b, hgt * wid, c).astype(self.dtype))
        if self.new_order:
            qkv = qkv.reshape(b, hgt * wid, 3, heads, head_dim)
        else:
            qkv = qkv.reshape(b, hgt * wid, heads, 3, head_dim).swapaxes(2, 3)
        out = attention.multi_head_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                             self.attention_impl)
        out = dense(c, c, ("heads", "embed"), self.dtype, zero=True, name="proj_out")(
            out.reshape(b, hgt * wid, c))
        return x + out.astype(jnp.float32).reshape(b, hgt, wid, c)


class LabelEmbedding(nn.Module):
    """Class labels -> [B, D] added to the timestep embedding (ADM's label_emb, N(0, 1)).

    A model trained with label dropout (classifier-free guidance) has an extra "null" row,
    selected by label == num_classes (`null_class`); without it the table is exactly ADM's
    (`num_classes` rows). The table's shape depends on `null_class` alone, so the train step
    may draw the dropout itself and run the model with `dropout_prob=0`.
    """
    num_classes: int
    features: int
    dropout_prob: float
    null_class: bool

    @nn.compact
    def __call__(self, labels, train: bool):
        rows = self.num_classes + (1 if self.null_class else 0)
        table = self.param("embedding", layers.logical(nn.initializers.normal(1.0),
                                                       ("vocab", "embed")),
                           (rows, self.features), jnp.float32)
        if train and self.dropout_prob > 0:
            labels = layers.drop_labels(self, labels, self.dropout_prob, self.num_classes)
        return jnp.take(table, labels, axis=0)


# ----------------------------------------------------------------------------- the model


class UNet(nn.Module):
    """ADM on NHWC inputs [B, H, W, C] -> [B, H, W, C or 2C]; labels in [0, num_classes]
    (num_classes = "null" when null_class); num_classes == 1 is unconditional."""
    input_size: int = 64
    in_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (16, 8)
    num_heads: int = 4
    num_head_channels: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dropout: float = 0.0
    num_classes: int = 1
    class_dropout_prob: float = 0.0
    null_class: bool = False      # a "null" label row (build_model: class_dropout_prob > 0)
    learn_sigma: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "auto"  # resolved per attention block (head dims differ by level)
    remat_policy: str = "none"
    routing: Mapping[str, Any] | None = None

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def routing_kind(self) -> str:
        return (self.routing or {}).get("kind", "none")

    @property
    def depth(self) -> int:
        """Routed blocks: ResBlocks and attention blocks (the train step looks for per-block
        router outputs by index; the UNet has none)."""
        layout = self.layout()
        stages = layout.input_blocks + (layout.middle_block,) + layout.output_blocks
        return sum(layer.kind in ("res", "attn") for stage in stages for layer in stage)

    def layout(self) -> Layout:
        return unet_layout(self.input_size, self.in_channels, self.model_channels,
                           self.channel_mult, self.num_res_blocks, self.attention_resolutions,
                           self.num_heads, self.num_head_channels, self.resblock_updown)

    def routing_mask(self, channels: int, block: int, t) -> jax.Array | None:
        """[B, channels] DTR / R-TR mask rows of routed block `block` (ResBlocks and attention
        blocks counted in call order) for timesteps t. DTR depends on the width only; R-TR
        draws a table per block, as the DiT's R-TR does (models/dtr.random_mask_rows)."""
        r = self.routing or {}
        if self.routing_kind == "dtr":
            return jnp.asarray(dtr_masks(r["num_tasks"], channels, r["alpha"], r["beta"]))[t]
        if self.routing_kind == "random":
            return random_mask_rows(r["seed"], block, t, channels, r["beta"])
        return None

    def _layer(self, layer: Layer, name: str, h, emb, t, train: bool, block: int | None):
        rows = None if block is None else self.routing_mask(layer.channels, block, t)
        mask = None if rows is None else rows[:, None, None, :]
        remat = self.remat_policy != "none"
        policy = REMAT_POLICIES[self.remat_policy]
        if layer.kind == "res":
            cls = nn.remat(ResBlock, static_argnums=(4,), policy=policy) if remat else ResBlock
            return cls(layer.channels, layer.out_channels, 4 * self.model_channels,
                       layer.updown, self.use_scale_shift_norm, self.dropout, self.dtype,
                       name=name)(h, emb, mask, train)
        if layer.kind == "attn":
            impl = attention.choose_implementation(self.attention_impl, self.dtype,
                                                   layer.channels // layer.num_heads)
            cls = nn.remat(AttentionBlock, policy=policy) if remat else AttentionBlock
            return cls(layer.channels, layer.num_heads, self.use_new_attention_order,
                       self.dtype, impl, name=name)(h, mask)
        if layer.kind == "down":
            return _conv_apply(conv(layer.out_channels, layer.channels, ("conv_in", "embed"),
                                    self.dtype, stride=2, name=f"{name}_op"), h, self.dtype)
        if layer.kind == "up":
            return _conv_apply(conv(layer.out_channels, layer.channels, ("conv_in", "embed"),
                                    self.dtype, name=f"{name}_conv"), upsample(h), self.dtype)
        return _conv_apply(conv(layer.out_channels, layer.channels, (None, "embed"),
                                self.dtype, name=name), h, self.dtype)

    @nn.compact
    def __call__(self, x, t, y=None, train: bool = False):
        if x.ndim != 4 or x.shape[1:] != (self.input_size, self.input_size, self.in_channels):
            raise ValueError(
                f"the ADM UNet expects NHWC inputs [B, {self.input_size}, {self.input_size}, "
                f"{self.in_channels}] but got {tuple(x.shape)}; check model.input_size and "
                "model.in_channels against the data.")
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        if self.routing_kind != "none":
            # Masks are indexed by the original (integer) timestep, also under respacing.
            t = t.astype(jnp.int32)
        y = jnp.zeros((batch,), jnp.int32) if y is None else jnp.asarray(y, jnp.int32)
        mc, emb_ch = self.model_channels, 4 * self.model_channels
        emb = layers.timestep_frequencies(t, mc)
        emb = dense(emb_ch, mc, ("freq", "embed"), self.dtype, name="time_embed_0")(
            emb.astype(self.dtype))
        emb = dense(emb_ch, emb_ch, ("mlp", "embed"), self.dtype, name="time_embed_2")(
            nn.silu(emb)).astype(jnp.float32)
        if self.num_classes > 1:
            emb = emb + LabelEmbedding(self.num_classes, emb_ch, self.class_dropout_prob,
                                       self.null_class,
                                       name="label_emb")(y, train)

        layout = self.layout()
        routed = itertools.count()

        def run(layer, name, h):
            block = next(routed) if layer.kind in ("res", "attn") else None
            return self._layer(layer, name, h, emb, t, train, block)

        h, skips = x.astype(jnp.float32), []
        for i, block in enumerate(layout.input_blocks):
            for j, layer in enumerate(block):
                h = run(layer, f"input_blocks_{i}_{j}", h)
            h = nn.with_logical_constraint(h, ("batch", "height", "width", "act_channels"))
            skips.append(h)
        for j, layer in enumerate(layout.middle_block):
            h = run(layer, f"middle_block_{j}", h)
        for i, block in enumerate(layout.output_blocks):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            for j, layer in enumerate(block):
                h = run(layer, f"output_blocks_{i}_{j}", h)
            h = nn.with_logical_constraint(h, ("batch", "height", "width", "act_channels"))
        h = nn.silu(group_norm("out_norm")(h))
        return _conv_apply(conv(self.out_channels, layout.out_channels_of_torso,
                                ("embed", None), self.dtype, zero=True, name="out_conv"), h,
                           self.dtype)
