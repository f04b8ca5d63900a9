"""The one DiT backbone (Peebles & Xie, 2023). Every method of this package configures it.

A block computes the plain adaLN-Zero DiT block, or, when a router hands it a channel mask m,
`z' = (1 - m) ⊙ z + DiTBlock(m ⊙ z)` (DTR / Switch-DiT). Its feed-forward network is the dense
MLP or any module with the same call signature (the DiffMoE mixtures).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switch_dit_jax.models import dtr, layers, roaming
from switch_dit_jax.models import moe, moe_baselines
from switch_dit_jax.models.switch import SwitchRouter, random_allocation_gates

# (depth, hidden_size, num_heads) of the official sizes.
DIT_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
# train.remat_policy -> what a rematerialised block keeps from its forward pass.
REMAT_POLICIES = {"none": None, "full": None,
                  "dots_saveable": jax.checkpoint_policies.dots_saveable}
DIT_MODELS = tuple(f"DiT-{s}/{p}" for s in DIT_SIZES for p in PATCH_SIZES)


def parse_model_name(name: str) -> dict[str, int]:
    """"DiT-XL/2" -> {depth, hidden_size, num_heads, patch_size}."""
    m = re.fullmatch(r"DiT-(S|B|L|XL)/(\d+)", name)
    if not m or int(m.group(2)) not in PATCH_SIZES:
        raise ValueError(f"model.name={name!r} is not a known model; use one of "
                         f"{', '.join(DIT_MODELS)}, or name='custom' with explicit depth, "
                         "hidden_size, num_heads and patch_size.")
    depth, hidden, heads = DIT_SIZES[m.group(1)]
    return dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(m.group(2)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block; optional task-routing mask; pluggable FFN.

    With a mask m, `integration` says how it enters (Switch-DiT Table 1): "mask_skip" (DTR, and
    Switch-DiT's "mask_skip_init") is (1 - m) ⊙ z + Block(m ⊙ z); "mask" and "mask_init" are
    Block(m ⊙ z); "direct" is Block(m).
    """
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    attention_impl: str = "xla"
    # Builds the FFN: ffn_factory(hidden_features=..., dtype=..., name="mlp") -> module(x).
    ffn_factory: Callable[..., nn.Module] = layers.Mlp
    integration: str = "mask_skip"
    head_dim: int | None = None  # attention head width (None = hidden_size / num_heads)

    @nn.compact
    def __call__(self, x, c, mask=None, train: bool = False, context=None):
        """x: [B, S, D] tokens, c: [B, D] conditioning, mask: None or broadcastable to x,
        context: None or (text tokens [B, L, D_text], their mask [B, L]) for cross-attention."""
        skip = None
        if mask is not None:
            if self.integration in ("mask_skip", "mask_skip_init"):
                skip = (1 - mask) * x
            x = mask if self.integration == "direct" else mask * x
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = layers.AdaLNModulation(
            6, self.dtype, name="adaLN_modulation")(c)
        h = layers.modulated_layer_norm(x, shift_msa, scale_msa)
        h = layers.Attention(self.num_heads, self.dtype, self.attention_impl, self.head_dim,
                             name="attn")(h)
        x = x + gate_msa[:, None] * h.astype(jnp.float32)
        if context is not None:  # T2I block (DTR Figure 8): plain LayerNorm, no adaLN gate
            h = layers.CrossAttention(self.num_heads, self.dtype, self.head_dim,
                                      name="cross_attn")(layers.layer_norm(x), *context)
            x = x + h.astype(jnp.float32)
        h = layers.modulated_layer_norm(x, shift_mlp, scale_mlp)
        h = self.ffn_factory(hidden_features=int(self.hidden_size * self.mlp_ratio),
                             dtype=self.dtype, name="mlp")(h, train)
        x = x + gate_mlp[:, None] * h.astype(jnp.float32)
        return x if skip is None else x + skip


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> zero-initialised Linear(D, p·p·C_out)."""
    patch_size: int
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        shift, scale = layers.AdaLNModulation(2, self.dtype, name="adaLN_modulation")(c)
        x = layers.modulate(layers.layer_norm(x), shift, scale)
        out = self.patch_size ** 2 * self.out_channels
        x = layers.dense(out, ("embed", "patch_out"), self.dtype, layers.zeros, "linear")(
            x.astype(self.dtype))
        return x.astype(jnp.float32)


class DiT(nn.Module):
    """Diffusion transformer on NHWC inputs [B, H, W, C] -> [B, H, W, C or 2C].

    `t` are timesteps (float; the Gaussian process passes integers 0..T-1, the flow objective
    passes t in [0, 1]); `y` are class labels in [0, num_classes], num_classes meaning "null".
    With num_classes == 1 the model is unconditional: its label table is one learned row that
    every sample adds (the official layout, so official FFHQ checkpoints import).

    With conditioning="text", `y` is {"text": [B, L, text_width] CLIP token states,
    "text_mask": [B, L] (True on real tokens)}: every block cross-attends to the text and adaLN
    is regressed from the timestep embedding alone (DTR Appendix C); there is no label table.
    """
    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "xla"  # the kernel: "xla" | "cudnn" (build_model resolves "auto")
    # Recompute each block in the backward pass: "none", "full" (keep only block inputs) or
    # "dots_saveable" (keep matmul outputs, recompute the elementwise work).
    remat_policy: str = "none"
    # Task routing (DTR / R-TR / Switch-DiT): see models.ROUTING_DEFAULTS for the fields.
    routing: Mapping[str, Any] | None = None
    # Feed-forward networks (dense MLP or a mixture): see models.FFN_DEFAULTS for the fields.
    ffn: Mapping[str, Any] | None = None
    head_dim: int | None = None  # attention head width (DiffMoE's option; None = D / heads)
    conditioning: str = "class"  # "class" (label table) | "text" (cross-attention to CLIP tokens)
    text_width: int = 768        # D_text of the text tokens (CLIP ViT-L/14: 768)
    text_length: int = 77        # L of the text tokens
    caption_dropout_prob: float = 0.1  # the train step's caption dropout (CFG's null caption)

    def ffn_factory(self, block: int) -> Callable[..., nn.Module]:
        """The FFN of block `block`: a mixture in every `every`-th block from `first`."""
        f = self.ffn or {}
        kind = f.get("kind", "mlp")
        if kind == "mlp" or block < f["first"] or (block - f["first"]) % f["every"]:
            # DiffMoE's use_swiglu makes the dense FFNs SwiGLUs too.
            return layers.SwiGLU if f.get("swiglu") else layers.Mlp
        common = dict(swiglu=f["swiglu"], shared_experts=f["shared_experts"])
        if kind == "diffmoe":
            return functools.partial(moe.DiffMoE, f["num_experts"], capacity=f["capacity"],
                                     threshold_decay=f["threshold_decay"],
                                     inference=f["inference"],
                                     interval_threshold=f["interval_threshold"],
                                     static_capacity=f["static_capacity"],
                                     capacity_schedule=tuple(f["capacity_schedule"]), **common)
        if kind == "token_choice":
            return functools.partial(moe_baselines.TokenChoiceMoE, f["num_experts"],
                                     top_k=f["top_k"], **common)
        return functools.partial(moe_baselines.ExpertChoiceMoE, f["num_experts"],
                                 capacity=f["capacity"],
                                 dynamic=f["ec_inference"] == "dynamic",
                                 threshold_decay=f["threshold_decay"],
                                 capacity_schedule=tuple(f["capacity_schedule"]), **common)

    @property
    def routing_kind(self) -> str:
        return (self.routing or {}).get("kind", "none")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    def fixed_masks(self) -> np.ndarray | None:
        """[T, D] routing masks that every block shares (DTR, CDTR, ERCDDT), indexed by the
        original timestep; None for the other kinds (R-TR draws a table per block)."""
        r = self.routing or {}
        if self.routing_kind == "dtr":
            return dtr.dtr_masks(r["num_tasks"], self.hidden_size, r["alpha"], r["beta"])
        if self.routing_kind == "cdtr":
            return dtr.cdtr_masks(r["num_tasks"], self.hidden_size, r["clusters"], r["alpha"],
                                  r["beta"])
        if self.routing_kind == "ercddt":
            return dtr.ercddt_masks(r["num_tasks"], self.hidden_size, r["clusters"])
        return None

    @nn.compact
    def __call__(self, x, t, y=None, train: bool = False):
        if x.ndim != 4 or x.shape[1:] != (self.input_size, self.input_size, self.in_channels):
            raise ValueError(
                f"DiT expects NHWC inputs [B, {self.input_size}, {self.input_size}, "
                f"{self.in_channels}] but got {tuple(x.shape)}; check model.input_size and "
                "model.in_channels against the data.")
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        context = None
        if self.conditioning == "text":
            context = self.text_context(y, batch)
        else:
            y = jnp.zeros((batch,), jnp.int32) if y is None else jnp.asarray(y, jnp.int32)

        pos = layers.sincos_pos_embed_2d(self.hidden_size, self.grid_size)
        h = layers.PatchEmbed(self.patch_size, self.hidden_size, self.dtype, name="x_embedder")(
            x.astype(self.dtype))
        h = h.astype(jnp.float32) + pos[None]
        h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))

        r = self.routing or {}
        t_embedder = layers.TimestepEmbedder(self.hidden_size, dtype=self.dtype,
                                             name="t_embedder")
        if self.routing_kind == "none":
            c = t_embedder(t)
        else:
            # Routed models index per-timestep tables by the original (integer) timestep.
            t = t.astype(jnp.int32)
            if self.routing_kind == "switch":
                # Every gate sees all T timesteps each step (the diffusion prior needs them).
                t_emb_all = t_embedder(jnp.arange(r["num_tasks"]))
                c = t_emb_all[t]
            else:
                c = t_embedder(t)
        if context is None:
            c = c + layers.LabelEmbedder(self.num_classes, self.hidden_size,
                                         self.class_dropout_prob, name="y_embedder")(y, train)
        masks = self.fixed_masks()
        fixed_gates = None
        if self.routing_kind == "switch" and r["allocation"] == "random":
            fixed_gates = random_allocation_gates(self.depth, r["num_experts"], r["top_k"],
                                                  r["num_tasks"], r["alpha"], r["seed"])

        block_cls = DiTBlock
        if self.remat_policy != "none":
            # `train` (argument 4, counting self) is a Python bool: static under remat.
            block_cls = nn.remat(DiTBlock, static_argnums=(4,),
                                 policy=REMAT_POLICIES[self.remat_policy])
        for i in range(self.depth):
            mask = None
            if masks is not None:
                mask = jnp.asarray(masks)[t][:, None, :]
            elif self.routing_kind == "random":
                mask = dtr.random_mask_rows(r["seed"], i, t, self.hidden_size,
                                            r["beta"])[:, None, :]
            elif self.routing_kind == "maxroaming":
                mask = roaming.block_rows(self, i, t)[:, None, :]
            elif self.routing_kind == "switch":
                # materialize: the router's share of h's cotangent is a matmul that XLA:CPU's
                # oneDNN fusion would otherwise sum with the block's share in one kernel
                # oneDNN cannot compile (cpu_tuning), costing the step its oneDNN matmuls.
                mask = SwitchRouter(
                    r["num_experts"], r["top_k"], r["integration"], r["noisy_gating"],
                    r["allocation"], None if fixed_gates is None else fixed_gates[i],
                    self.dtype, name=f"routers_{i}")(layers.materialize(h), t_emb_all, t,
                                                     train)
            integration = r.get("integration", "mask_skip") if self.routing_kind == "switch" \
                else "mask_skip"
            h = block_cls(self.hidden_size, self.num_heads, self.mlp_ratio, self.dtype,
                          self.attention_impl, ffn_factory=self.ffn_factory(i),
                          integration=integration, head_dim=self.head_dim,
                          name=f"blocks_{i}")(h, c, mask, train, context)
            h = layers.materialize(nn.with_logical_constraint(h, ("batch", "length", "act_embed")))

        h = FinalLayer(self.patch_size, self.out_channels, self.dtype, name="final_layer")(h, c)
        return self.unpatchify(h)

    def text_context(self, y, batch: int) -> tuple[jax.Array, jax.Array]:
        """(tokens, mask) of a text condition, checked against the model's text shape."""
        if not isinstance(y, Mapping) or set(y) != {"text", "text_mask"}:
            raise ValueError("a conditioning='text' model takes y={'text': [B, L, D], "
                             "'text_mask': [B, L]}, not class labels; check that the data "
                             "yields captions (data.name='digits_text' or captioned latents).")
        text, mask = jnp.asarray(y["text"], jnp.float32), jnp.asarray(y["text_mask"], bool)
        want = (batch, self.text_length, self.text_width)
        if text.shape != want or mask.shape != want[:2]:
            raise ValueError(f"text condition of shape {tuple(text.shape)} (mask "
                             f"{tuple(mask.shape)}) but the model takes {want}; set "
                             "model.text_length / model.text_width to the text encoder's.")
        return text, mask

    def unpatchify(self, h: jax.Array) -> jax.Array:
        """[B, S, p·p·C] -> [B, H, W, C] (the per-token features are ordered (p, q, C))."""
        b, g, p, c = h.shape[0], self.grid_size, self.patch_size, self.out_channels
        h = h.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, g * p, g * p, c)
