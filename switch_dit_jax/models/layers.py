"""Building blocks of the DiT backbone: embedders, attention, MLP, adaLN modulation.

Initialisation follows the official DiT (facebookresearch/DiT `models.py`): xavier-uniform
linears with zero bias, N(0, 0.02) timestep MLP and label table, zero adaLN and final layer.
Parameters are float32 and carry logical axis names (see `switch_dit_jax.parallel`); matmuls
run in `dtype` (the compute dtype).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switch_dit_jax.models import attention

Dtype = Any

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()
normal_002 = nn.initializers.normal(stddev=0.02)


def logical(init, names: Sequence[str | None]):
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, tuple(names))


class Dense(nn.Dense):
    """nn.Dense (the same parameters) applied to the inputs flattened to [N, D_in].

    XLA:CPU differentiates a dot_general with several batch-like leading dimensions through a
    transposed copy of the activations, which it fuses with (and so recomputes) their whole
    producer chain; on [N, D] the gradient is a plain matrix product.

    On the CPU the bias is added after the output is reshaped back: oneDNN (cpu_tuning) takes
    a bias add that directly follows its matmul into the matmul by first writing the bias out
    at the output's full size (DiT-S/2's train step: 250 ms of 1.45 s); after the reshape it
    joins the next elementwise fusion instead. Elsewhere it stays next to the matmul, where a
    GPU's GEMM epilogue can take it.
    """

    @nn.compact
    def __call__(self, inputs):
        lead, d = inputs.shape[:-1], inputs.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (d, self.features), self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x.reshape(-1, d), kernel, (((1,), (0,)), ((), ())),
                                precision=self.precision)
        after_reshape = jax.default_backend() == "cpu"
        if bias is not None and not after_reshape:
            y = y + bias
        y = y.reshape(*lead, self.features)
        return y + bias if bias is not None and after_reshape else y


def dense(features: int, names: tuple[str | None, str | None], dtype: Dtype,
          kernel_init=xavier_uniform, name: str | None = None) -> nn.Dense:
    """A Linear with torch-style xavier init (fan_in, fan_out of the 2-D weight) and zero bias."""
    return Dense(features, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=logical(kernel_init, names),
                 bias_init=logical(zeros, names[1:]), name=name)


def _stored(x: jax.Array) -> jax.Array:
    # A conditional is a boundary XLA does not fuse across, and JAX keeps it because the
    # branches differ (the second multiplies by one); the predicate is a value XLA cannot fold.
    return jax.lax.cond(jnp.isfinite(x.reshape(-1)[0]), lambda v: v, lambda v: v * 1.0, x)


@jax.custom_vjp
def _materialize_cpu(x):
    return _stored(x)


_materialize_cpu.defvjp(lambda x: (_stored(x), None), lambda _, g: (_stored(g),))


def materialize(x: jax.Array) -> jax.Array:
    """The identity; on CPU, XLA computes its value and its cotangent once and stores them.

    Between blocks, the residual stream and its cotangent are chains of elementwise adds.
    XLA:CPU fuses such chains into every consumer, recomputing the stream (and, in the
    backward pass, the cotangent) of all earlier blocks inside each later fusion: a cost that
    grows with the square of the depth (DiT-S/2's train step spent 28 % of its time in it).
    `optimization_barrier` does not help, since XLA:CPU drops it before fusion. GPUs and TPUs
    price duplication in their fusion passes, and a conditional would cost a GPU a host sync,
    so there this is the plain identity.
    """
    return _materialize_cpu(x) if jax.default_backend() == "cpu" else x


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _norm_stats(x):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + 1e-6)
    return (x - mean) * rstd, rstd


@jax.custom_vjp
def modulated_layer_norm(x, shift, scale):
    """modulate(layer_norm(x), shift, scale) with a two-pass backward."""
    return modulate(_norm_stats(x)[0], shift, scale)


def _mln_fwd(x, shift, scale):
    xhat, rstd = _norm_stats(x)
    return modulate(xhat, shift, scale), (xhat, rstd, scale)


def _mln_bwd(res, dy):
    xhat, rstd, scale = res
    g = dy * (1 + scale[:, None, :])
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, dy.sum(1), (dy * xhat).sum(1)


modulated_layer_norm.defvjp(_mln_fwd, _mln_bwd)


_GELU_C = math.sqrt(2 / math.pi)


@jax.custom_vjp
def gelu_tanh(x):
    """GELU, tanh approximation (timm's / the official DiT's `GELU(approximate="tanh")`).

    Its backward keeps only x and recomputes tanh, where autodiff of nn.gelu keeps several
    intermediates of the size of the widest activation of a block (−1 % DiT-S/2 step on CPU).
    """
    return nn.gelu(x, approximate=True)


def _gelu_fwd(x):
    return nn.gelu(x, approximate=True), x


def _gelu_bwd(x, dy):
    # d/dx 0.5·x·(1 + tanh(u)), u = c·(x + 0.044715·x³)
    t = jnp.tanh(_GELU_C * (x + 0.044715 * x * x * x))
    dudx = _GELU_C * (1 + 3 * 0.044715 * x * x)
    return (dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dudx),)


gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)


def layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without affine parameters, eps 1e-6, computed in float32 for stability."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6)


def timestep_frequencies(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of (possibly fractional) timesteps, [cos | sin] as in DiT."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """Frozen 2-D sin-cos position table [grid_size**2, embed_dim] (MAE/DiT layout).

    Token i*grid+j gets [emb_1d(j) | emb_1d(i)]: the first half encodes the column, as in the
    official code, so that imported checkpoints see the positions they were trained with.
    """
    if embed_dim % 4:
        raise ValueError(f"hidden_size={embed_dim} must be divisible by 4 for the 2-D sin-cos "
                         "position embedding; pick a multiple of 4.")
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                             np.arange(grid_size, dtype=np.float64), indexing="ij")

    def emb_1d(pos):
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([emb_1d(cols), emb_1d(rows)], axis=1).astype(np.float32)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches of an NHWC image to tokens [B, (H/p)·(W/p), D]."""
    patch_size: int
    hidden_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        # torch's xavier on the weight viewed as [D, C·p·p]: fan_in = C·p·p, fan_out = D.
        init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                in_axis=(0, 1, 2), out_axis=3)
        x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID",
                    dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=logical(init, (None, None, None, "embed")),
                    bias_init=logical(zeros, ("embed",)), name="proj")(x)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


class TimestepEmbedder(nn.Module):
    """Timesteps -> sinusoidal features -> Linear -> SiLU -> Linear."""
    hidden_size: int
    frequency_embedding_size: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        x = timestep_frequencies(t, self.frequency_embedding_size)
        x = dense(self.hidden_size, ("freq", "embed"), self.dtype, normal_002, "mlp_0")(x)
        x = nn.silu(x)
        return dense(self.hidden_size, ("mlp", "embed"), self.dtype, normal_002, "mlp_2")(x)


def drop_labels(module: nn.Module, labels, dropout_prob: float, null_label: int):
    """Classifier-free guidance's label dropout: each label becomes `null_label` with
    probability `dropout_prob`, drawn from `module`'s 'dropout' rng stream."""
    if not module.has_rng("dropout"):
        raise ValueError("train=True with class_dropout_prob > 0 needs a label-dropout "
                         "key: call model.apply(..., rngs={'dropout': key}).")
    drop = jax.random.uniform(module.make_rng("dropout"), labels.shape) < dropout_prob
    return jnp.where(drop, null_label, labels)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with an extra "null" row used for classifier-free guidance.

    Labels equal to `num_classes` select the null row; in training each label is replaced by it
    with probability `dropout_prob` (rng stream 'dropout'). An unconditional model
    (num_classes == 1) has the official one-row table and no null row: every sample adds the
    same learned vector, as in the official Switch-DiT / DTR FFHQ models.
    """
    num_classes: int
    hidden_size: int
    dropout_prob: float

    @nn.compact
    def __call__(self, labels, train: bool):
        rows = 1 if self.num_classes == 1 else self.num_classes + 1
        table = self.param("embedding_table", logical(normal_002, ("vocab", "embed")),
                           (rows, self.hidden_size), jnp.float32)
        if rows == 1:
            return jnp.broadcast_to(table[0], labels.shape + (self.hidden_size,))
        if train and self.dropout_prob > 0:
            labels = drop_labels(self, labels, self.dropout_prob, self.num_classes)
        return jnp.take(table, labels, axis=0)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout: [3, heads, head_dim]).

    `head_dim` (DiffMoE's option) decouples the head width from D: qkv maps D to
    3·heads·head_dim and proj maps heads·head_dim back to D; None means D / heads.
    """
    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = "xla"  # "xla" | "cudnn": see models/attention.py
    head_dim: int | None = None

    @nn.compact
    def __call__(self, x):
        b, s, d = x.shape
        head_dim = self.head_dim or d // self.num_heads
        inner = self.num_heads * head_dim
        qkv = dense(3 * inner, ("embed", "qkv"), self.dtype, name="qkv")(x.astype(self.dtype))
        qkv = qkv.reshape(b, s, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = attention.multi_head_attention(q, k, v, self.implementation)
        return dense(d, ("heads", "embed"), self.dtype, name="proj")(out.reshape(b, s, inner))


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to text tokens (DTR Appendix C, Figure 8): the
    self-attention's design with the text as keys and values, projected from the text width.

    Padding tokens (`context_mask` False) are masked out of the softmax, so they cannot change
    the output. The output projection starts at zero: a new T2I block starts as the block
    without text, as adaLN-Zero starts every block as the identity.
    """
    num_heads: int
    dtype: Dtype = jnp.float32
    head_dim: int | None = None

    @nn.compact
    def __call__(self, x, context, context_mask):
        b, s, d = x.shape
        head_dim = self.head_dim or d // self.num_heads
        inner = self.num_heads * head_dim
        q = dense(inner, ("embed", "qkv"), self.dtype, name="q")(x.astype(self.dtype))
        kv = dense(2 * inner, ("text_embed", "qkv"), self.dtype, name="kv")(
            context.astype(self.dtype))
        q = q.reshape(b, s, self.num_heads, head_dim)
        kv = kv.reshape(b, context.shape[1], 2, self.num_heads, head_dim)
        mask = jnp.asarray(context_mask, bool)[:, None, None, :]  # [B, heads, S, L]
        out = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1], mask=mask,
                                           implementation="xla")
        return dense(d, ("heads", "embed"), self.dtype, zeros, "proj")(out.reshape(b, s, inner))


class Mlp(nn.Module):
    """The DiT feed-forward network: Linear(D, r·D) -> GELU(tanh) -> Linear(r·D, D)."""
    hidden_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # the FFN call signature of the mixtures, which behave differently in training
        d = x.shape[-1]
        h = dense(self.hidden_features, ("embed", "mlp"), self.dtype, name="fc1")(
            x.astype(self.dtype))
        h = gelu_tanh(h)
        return dense(d, ("mlp", "embed"), self.dtype, name="fc2")(h)


class SwiGLU(nn.Module):
    """DiffMoE's `use_swiglu` FFN (its MoeMLP): down(SiLU(gate(x)) · up(x)), bias-free Linears
    D -> hidden, D -> hidden, hidden -> D (hidden = r·D, as its GELU MLP)."""
    hidden_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        d, x = x.shape[-1], x.astype(self.dtype)

        def linear(features, names, name):
            return Dense(features, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                         kernel_init=logical(xavier_uniform, names), name=name)
        h = nn.silu(linear(self.hidden_features, ("embed", "mlp"), "gate_proj")(x)) * linear(
            self.hidden_features, ("embed", "mlp"), "up_proj")(x)
        return linear(d, ("mlp", "embed"), "down_proj")(h)


class AdaLNModulation(nn.Module):
    """SiLU(c) -> zero-initialised Linear(D, n·D), split into n vectors (adaLN-Zero)."""
    num_chunks: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c):
        d = c.shape[-1]
        out = dense(self.num_chunks * d, ("embed", "adaln"), self.dtype, zeros, "linear")(
            nn.silu(c).astype(self.dtype))
        return jnp.split(out.astype(jnp.float32), self.num_chunks, axis=-1)
