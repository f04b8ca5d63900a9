"""Analytic compute of every model family, and the peak of the accelerators, for MFU.

Counts are multiply-accumulates (MACs) of the matmuls, the convention of the DiT paper's
"Gflops" column (DiT-XL/2: 118.6 G per 256×256 image); elementwise work is left out, as there.
FLOPs = 2 × MACs. A training step costs about 3 × its forward pass (the backward pass does two
matmuls per forward matmul); classifier-free-guided sampling runs the model on 2 × the batch.

Mixtures count their activated experts: DiffMoE and EC-DiT process C experts per token on
average (C_train in training, the measured C_infer at inference), TC-DiT top_k per token. Each
mixture layer adds its router, DiffMoE its capacity predictor (D·D + D·E per token), and a
shared expert runs on every token. SwiGLU FFNs count three matmuls, the MLP two; attention
counts heads·head_dim features (DiffMoE's head_dim option).
Switch-DiT adds per block one D×D mask matmul per token (the per-sample mixed experts) and,
per step rather than per image, the gates of all T timesteps for the diffusion prior.

The ADM UNet (backbone "adm") counts its convolutions as k²·C_in·C_out per output position
(zero padding included, as fvcore and the DiT count do), its attention blocks as the DiT's
(qkv, QKᵀ, PV, proj), and its per-image dense layers (timestep MLP, each ResBlock's embedding
projection); GroupNorm, SiLU, resampling by pooling/repeat and the skip additions are
elementwise and left out, as the DiT's LayerNorms and modulations are.
"""
from __future__ import annotations

from switch_dit_jax.models.unet import UNet

FREQUENCY_FEATURES = 256  # sinusoidal timestep features entering the timestep MLP

# Peak dense matmul FLOP/s per device (vendor figures, no sparsity), by device kind and dtype.
PEAK_FLOPS = {
    ("H100", "bfloat16"): 989e12, ("H100", "float32"): 67e12,  # SXM; fp32 without TF32
    ("H200", "bfloat16"): 989e12, ("H200", "float32"): 67e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 19.5e12,
    ("TPU v4", "bfloat16"): 275e12,
    ("TPU v5 lite", "bfloat16"): 197e12,  # v5e
    ("TPU v5p", "bfloat16"): 459e12,
    ("TPU v6 lite", "bfloat16"): 918e12,  # v6e
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Peak FLOP/s of one device of `device_kind` (jax's Device.device_kind) in `dtype`."""
    for (name, dt), value in PEAK_FLOPS.items():
        if name in device_kind and dt == dtype:
            return value
    return None


def _shared_macs(f: dict, d: int, hidden: int) -> float:
    """MACs per token of a mixture's shared expert (moe.shared_expert): DiffMoE's GELU MLP
    of width 2·hidden, TC-/EC-DiT's SwiGLU of width count·D (three D x width matmuls)."""
    count = f.get("shared_experts", 0)
    if count == 0:
        return 0
    return 2 * d * (2 * hidden) if f["kind"] == "diffmoe" else 3 * d * (count * d)


def _ffn_macs(model, block: int, capacity: float | None) -> float:
    """MACs per token of block `block`'s feed-forward network."""
    d = model.hidden_size
    hidden = int(d * model.mlp_ratio)
    f = model.ffn or {}
    # SwiGLU (use_swiglu): gate, up and down projections; the MLP: fc1 and fc2.
    dense = (3 if f.get("swiglu") else 2) * d * hidden
    kind = f.get("kind", "mlp")
    if kind == "mlp" or block < f["first"] or (block - f["first"]) % f["every"]:
        return dense
    e = f["num_experts"]
    shared = _shared_macs(f, d, hidden)
    if kind == "token_choice":
        return d * e + f["top_k"] * dense + shared
    c = f["capacity"] if capacity is None else capacity
    predictor = d * d + d * e if kind == "diffmoe" else 0
    return d * e + predictor + c * dense + shared


def forward_macs_per_image(model, capacity: float | None = None) -> dict[str, float]:
    """MACs of one forward pass per image, by part, and their "total".

    `model` is a built DiT or ADM UNet (models.build_model); `capacity` overrides the
    mixtures' C (e.g. a measured C_infer for DiffMoE inference).
    """
    if isinstance(model, UNet):
        return unet_forward_macs_per_image(model)
    d, p, s = model.hidden_size, model.patch_size, model.grid_size ** 2
    inner = model.num_heads * (model.head_dim or d // model.num_heads)  # heads · head_dim
    adaln = 6 * d * d
    parts = {
        "patch_embed": s * model.in_channels * p * p * d,
        "conditioning": FREQUENCY_FEATURES * d + d * d,
        # qkv (D -> 3·inner), proj (inner -> D); QKᵀ and PV
        "attention": model.depth * s * (4 * d * inner + 2 * s * inner),
        "ffn": sum(s * _ffn_macs(model, i, capacity) for i in range(model.depth)),
        "adaln": model.depth * adaln + 2 * d * d,
        "final_layer": s * d * p * p * model.out_channels,
    }
    if getattr(model, "conditioning", "class") == "text":
        # T2I cross-attention per block: q (D -> inner) and proj (inner -> D) per image token,
        # k and v (D_text -> inner) per text token, QKᵀ and PV over the L text tokens.
        length = model.text_length
        parts["cross_attention"] = model.depth * (
            s * 2 * d * inner + length * 2 * model.text_width * inner + 2 * s * length * inner)
    if model.routing_kind == "switch":
        m_exp = model.routing["num_experts"]
        parts["switch_mask"] = model.depth * (s * d * d + m_exp * d * d)  # mix, then apply
    parts["total"] = sum(parts.values())
    return parts


def _conv_taps(size: int, kernel: int, stride: int, count_padding: bool) -> int:
    """Kernel taps summed over the output positions of one spatial axis of a 'same'-padded
    convolution; without `count_padding`, only the taps that land inside the input (what
    XLA's cost analysis counts)."""
    out, pad = size // stride, kernel // 2
    if count_padding:
        return out * kernel
    return sum(0 <= o * stride - pad + k < size for o in range(out) for k in range(kernel))


def unet_forward_macs_per_image(model: UNet, count_padding: bool = True) -> dict[str, float]:
    """MACs of one ADM UNet forward pass per image, by part, and their "total"; see the
    module docstring for what counts. `count_padding=False` leaves out the kernel taps on
    the zero padding of the convolutions, as XLA's cost analysis does."""
    emb = 4 * model.model_channels
    parts = dict(conditioning=model.model_channels * emb + emb * emb, resblocks=0.0,
                 attention=0.0, resample=0.0, stem_and_out=0.0)

    def conv(size, cin, cout, kernel=3, stride=1):
        return _conv_taps(size, kernel, stride, count_padding) ** 2 * cin * cout

    def layer_macs(layer, size):
        """(part, MACs, spatial size after the layer) of one layout layer at `size`."""
        c, out = layer.channels, layer.out_channels
        if layer.kind == "res":
            after = {"up": size * 2, "down": size // 2}.get(layer.updown, size)
            parts["conditioning"] += emb * (2 * out if model.use_scale_shift_norm else out)
            macs = conv(after, c, out) + conv(after, out, out)
            if out != c:
                macs += conv(after, c, out, kernel=1)
            return "resblocks", macs, after
        if layer.kind == "attn":
            s = size * size
            return "attention", s * (4 * c * c + 2 * s * c), size
        if layer.kind == "down":
            return "resample", conv(size, c, out, stride=2), size // 2
        if layer.kind == "up":
            return "resample", conv(2 * size, c, out), 2 * size
        return "stem_and_out", conv(size, c, out), size

    layout, size = model.layout(), model.input_size
    for block in layout.input_blocks + (layout.middle_block,) + layout.output_blocks:
        for layer in block:
            part, macs, size = layer_macs(layer, size)
            parts[part] += macs
    parts["stem_and_out"] += conv(size, layout.out_channels_of_torso, model.out_channels)
    parts["total"] = sum(parts.values())
    return parts


def per_step_extra_macs(model) -> float:
    """MACs per train step that do not scale with the batch: Switch-DiT embeds all T
    timesteps and evaluates every block's gate on them for the diffusion prior loss."""
    if model.routing_kind != "switch" or model.routing["allocation"] == "random":
        return 0.0
    d, t = model.hidden_size, model.routing["num_tasks"]
    return t * (FREQUENCY_FEATURES * d + d * d + model.depth * d * model.routing["num_experts"])


def train_flops_per_step(model, batch: int) -> float:
    """FLOPs of one training step on `batch` images: 3 × (forward) × 2 FLOPs per MAC."""
    return 6.0 * (batch * forward_macs_per_image(model)["total"] + per_step_extra_macs(model))


def sample_flops_per_image(model, num_steps: int, cfg: bool,
                           capacity: float | None = None) -> float:
    """FLOPs to sample one image: num_steps model evaluations (Heun: pass 2 × its steps),
    doubled under classifier-free guidance."""
    macs = forward_macs_per_image(model, capacity)["total"]
    return 2.0 * macs * num_steps * (2 if cfg else 1)


def mfu(flops_per_s: float, device_kind: str, dtype: str, num_devices: int) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices (None if the
    device is not in the peak table, e.g. a CPU)."""
    peak = peak_flops(device_kind, dtype)
    return None if peak is None else flops_per_s / (peak * num_devices)
