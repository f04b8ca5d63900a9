"""The CLIP text and vision transformers in Flax linen, as Hugging Face's `CLIPModel` computes
them (pre-LN blocks, causal self-attention in the text tower, quick-GELU or GELU).

Submodule names follow the Hugging Face keys so that `weights.py` maps them one to one.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from switch_dit_jax.text.config import ClipConfig, TextConfig, Tower, VisionConfig

# true float32, as PyTorch computes CLIP (GPUs would otherwise use TF32): the text states are
# stored as training data and the CLIP score is a metric, both worth the slower matmuls
HI = jax.lax.Precision.HIGHEST


def _act(name: str, x):
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=False)  # transformers' "gelu" is the erf form


class EncoderLayer(nn.Module):
    tower: Tower

    @nn.compact
    def __call__(self, x, causal: bool):
        t = self.tower
        b, n, _ = x.shape
        head = t.width // t.heads
        h = nn.LayerNorm(epsilon=t.eps, name="layer_norm1")(x)

        def split(name):
            return nn.Dense(t.width, precision=HI, name=name)(h).reshape(b, n, t.heads, head)
        q = split("q_proj") * head ** -0.5
        k, v = split("k_proj"), split("v_proj")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HI)
        if causal:  # each token sees itself and the tokens before it, never padding-masked
            mask = jnp.tril(jnp.ones((n, n), bool))
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v, precision=HI)
        x = x + nn.Dense(t.width, precision=HI, name="out_proj")(o.reshape(b, n, t.width))
        h = nn.LayerNorm(epsilon=t.eps, name="layer_norm2")(x)
        h = _act(t.act, nn.Dense(t.mlp_width, precision=HI, name="fc1")(h))
        h = nn.Dense(t.width, precision=HI, name="fc2")(h)
        return x + h


class Encoder(nn.Module):
    tower: Tower
    causal: bool

    @nn.compact
    def __call__(self, x):
        for i in range(self.tower.layers):
            x = EncoderLayer(self.tower, name=f"layers_{i}")(x, self.causal)
        return x


class TextTransformer(nn.Module):
    """input_ids [B, L] -> last_hidden_state [B, L, D] (after the final LayerNorm)."""
    config: TextConfig

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        tokens = nn.Embed(c.vocab_size, c.tower.width, name="token_embedding")(input_ids)
        positions = self.param("position_embedding", nn.initializers.normal(0.01),
                               (c.max_length, c.tower.width))
        x = tokens + positions[: input_ids.shape[1]]
        x = Encoder(c.tower, causal=True, name="encoder")(x)
        return nn.LayerNorm(epsilon=c.tower.eps, name="final_layer_norm")(x)


def eos_positions(input_ids, eos_token_id: int):
    """Where Hugging Face pools the text: the largest id for configs with the legacy
    eos_token_id 2 (the EOS of OpenAI's vocabulary is its last id), else the first EOS."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class VisionTransformer(nn.Module):
    """pixels [B, S, S, C] (normalised) -> post_layernorm(CLS) [B, D]."""
    config: VisionConfig

    @nn.compact
    def __call__(self, pixels):
        c = self.config
        width, p = c.tower.width, c.patch_size
        x = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    precision=HI, name="patch_embedding")(pixels)
        b = x.shape[0]
        x = x.reshape(b, -1, width)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (width,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)), x], axis=1)
        positions = self.param("position_embedding", nn.initializers.normal(0.02),
                               ((c.image_size // p) ** 2 + 1, width))
        x = nn.LayerNorm(epsilon=c.tower.eps, name="pre_layrnorm")(x + positions)
        x = Encoder(c.tower, causal=False, name="encoder")(x)
        return nn.LayerNorm(epsilon=c.tower.eps, name="post_layernorm")(x[:, 0])


class ClipModel(nn.Module):
    """Both towers and their projections: `text_embeds(ids)` and `image_embeds(pixels)`."""
    config: ClipConfig

    def setup(self):
        c = self.config
        self.text_model = TextTransformer(c.text)
        self.vision_model = VisionTransformer(c.vision)
        self.text_projection = nn.Dense(c.projection_dim, use_bias=False, precision=HI)
        self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, precision=HI)

    def text_embeds(self, input_ids):
        hidden = self.text_model(input_ids)
        pooled = hidden[jnp.arange(hidden.shape[0]),
                        eos_positions(input_ids, self.config.text.eos_token_id)]
        return self.text_projection(pooled)

    def image_embeds(self, pixels):
        return self.visual_projection(self.vision_model(pixels))

    def __call__(self, input_ids, pixels):  # init only: it creates every variable
        return self.text_embeds(input_ids), self.image_embeds(pixels)
