"""An independent NumPy model of openai/guided-diffusion's UNetModel, for tests.

Written from guided-diffusion `unet.py` / `nn.py` semantics in torch layout (NCHW, torch key
names, Conv weights OIHW, Conv1d [out, in, 1]), sharing no code with the package:
`state_dict_shapes(opts)` lists every key of the state dict with its shape, and
`forward(sd, opts, x_nchw, t, y)` runs the network.
"""
import math

import numpy as np


def _res_shapes(prefix, ch, out, emb, scale_shift):
    s = {f"{prefix}.in_layers.0.weight": (ch,), f"{prefix}.in_layers.0.bias": (ch,),
         f"{prefix}.in_layers.2.weight": (out, ch, 3, 3), f"{prefix}.in_layers.2.bias": (out,),
         f"{prefix}.emb_layers.1.weight": ((2 if scale_shift else 1) * out, emb),
         f"{prefix}.emb_layers.1.bias": ((2 if scale_shift else 1) * out,),
         f"{prefix}.out_layers.0.weight": (out,), f"{prefix}.out_layers.0.bias": (out,),
         f"{prefix}.out_layers.3.weight": (out, out, 3, 3), f"{prefix}.out_layers.3.bias": (out,)}
    if out != ch:
        s[f"{prefix}.skip_connection.weight"] = (out, ch, 1, 1)
        s[f"{prefix}.skip_connection.bias"] = (out,)
    return s


def _attn_shapes(prefix, ch):
    return {f"{prefix}.norm.weight": (ch,), f"{prefix}.norm.bias": (ch,),
            f"{prefix}.qkv.weight": (3 * ch, ch, 1), f"{prefix}.qkv.bias": (3 * ch,),
            f"{prefix}.proj_out.weight": (ch, ch, 1), f"{prefix}.proj_out.bias": (ch,)}


def structure(o):
    """guided-diffusion's module lists: [(kind, prefix, ch, out, extra)] per stage, where
    `o` has image_size, in_channels, model_channels, out_channels, num_res_blocks,
    attention_resolutions (pixels), channel_mult, num_heads, num_head_channels,
    resblock_updown, use_scale_shift_norm, use_new_attention_order, num_classes (or None)."""
    mc = o["model_channels"]
    attn_ds = [o["image_size"] // r for r in o["attention_resolutions"]]

    def heads(ch):
        return o["num_heads"] if o["num_head_channels"] == -1 else ch // o["num_head_channels"]

    ch = int(o["channel_mult"][0] * mc)
    inputs = [[("conv", "input_blocks.0.0", o["in_channels"], ch, None)]]
    chans, ds = [ch], 1
    for level, mult in enumerate(o["channel_mult"]):
        for _ in range(o["num_res_blocks"]):
            i = len(inputs)
            block = [("res", f"input_blocks.{i}.0", ch, int(mult * mc), None)]
            ch = int(mult * mc)
            if ds in attn_ds:
                block.append(("attn", f"input_blocks.{i}.1", ch, ch, heads(ch)))
            inputs.append(block)
            chans.append(ch)
        if level != len(o["channel_mult"]) - 1:
            i = len(inputs)
            kind = "resdown" if o["resblock_updown"] else "down"
            inputs.append([(kind, f"input_blocks.{i}.0", ch, ch, None)])
            chans.append(ch)
            ds *= 2
    middle = [("res", "middle_block.0", ch, ch, None),
              ("attn", "middle_block.1", ch, ch, heads(ch)),
              ("res", "middle_block.2", ch, ch, None)]
    outputs = []
    for level, mult in list(enumerate(o["channel_mult"]))[::-1]:
        for i in range(o["num_res_blocks"] + 1):
            k = len(outputs)
            ich = chans.pop()
            block = [("res", f"output_blocks.{k}.0", ch + ich, int(mc * mult), None)]
            ch = int(mc * mult)
            if ds in attn_ds:
                block.append(("attn", f"output_blocks.{k}.1", ch, ch, heads(ch)))
            if level and i == o["num_res_blocks"]:
                kind = "resup" if o["resblock_updown"] else "up"
                block.append((kind, f"output_blocks.{k}.{len(block)}", ch, ch, None))
                ds //= 2
            outputs.append(block)
    return inputs, middle, outputs, ch


def state_dict_shapes(o):
    mc, emb = o["model_channels"], 4 * o["model_channels"]
    shapes = {"time_embed.0.weight": (emb, mc), "time_embed.0.bias": (emb,),
              "time_embed.2.weight": (emb, emb), "time_embed.2.bias": (emb,)}
    if o["num_classes"] is not None:
        shapes["label_emb.weight"] = (o["num_classes"], emb)
    inputs, middle, outputs, ch = structure(o)
    for layer in [x for b in inputs for x in b] + middle + [x for b in outputs for x in b]:
        kind, p, cin, cout, _ = layer
        if kind in ("res", "resup", "resdown"):
            shapes.update(_res_shapes(p, cin, cout, emb, o["use_scale_shift_norm"]))
        elif kind == "attn":
            shapes.update(_attn_shapes(p, cin))
        else:
            name = {"conv": p, "down": p + ".op", "up": p + ".conv"}[kind]
            shapes[name + ".weight"] = (cout, cin, 3, 3)
            shapes[name + ".bias"] = (cout,)
    shapes.update({"out.0.weight": (ch,), "out.0.bias": (ch,),
                   "out.2.weight": (o["out_channels"], ch, 3, 3),
                   "out.2.bias": (o["out_channels"],)})
    return shapes


# ----------------------------------------------------------------------------- forward


def _silu(x):
    return x / (1 + np.exp(-x))


def _group_norm(sd, name, x, groups=32):
    b, c = x.shape[:2]
    g = x.reshape(b, groups, -1).astype(np.float64)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return (g.reshape(x.shape) * sd[name + ".weight"].reshape(shape)
            + sd[name + ".bias"].reshape(shape))


def _conv2d(sd, name, x, stride=1):
    w, bias = sd[name + ".weight"], sd[name + ".bias"]
    k = w.shape[-1]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    b, c, h, wd = x.shape
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((b, w.shape[0], oh, ow))
    for dy in range(k):
        for dx in range(k):
            patch = xp[:, :, dy:dy + stride * oh:stride, dx:dx + stride * ow:stride]
            out += np.einsum("bchw,oc->bohw", patch, w[:, :, dy, dx])
    return out + bias[None, :, None, None]


def _up(x):
    return x.repeat(2, axis=2).repeat(2, axis=3)


def _avg(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def _resblock(sd, p, x, emb, o, updown, mask):
    h = _group_norm(sd, p + ".in_layers.0", x)
    if mask is not None:  # DTR (Pseudo Code 2): mask the normalised activations
        h = h * mask[:, :, None, None]
    h = _silu(h)
    if updown == "up":
        h, x = _up(h), _up(x)
    elif updown == "down":
        h, x = _avg(h), _avg(x)
    h = _conv2d(sd, p + ".in_layers.2", h)
    e = _silu(emb) @ sd[p + ".emb_layers.1.weight"].T + sd[p + ".emb_layers.1.bias"]
    e = e[:, :, None, None]
    if o["use_scale_shift_norm"]:
        scale, shift = np.split(e, 2, axis=1)
        h = _group_norm(sd, p + ".out_layers.0", h) * (1 + scale) + shift
    else:
        h = _group_norm(sd, p + ".out_layers.0", h + e)
    h = _conv2d(sd, p + ".out_layers.3", _silu(h))
    if p + ".skip_connection.weight" in sd:
        x = _conv2d(sd, p + ".skip_connection", x)
    return x + h


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _attention(sd, p, x, heads, new_order, mask):
    b, c, h, w = x.shape
    flat = x.reshape(b, c, -1)
    n = _group_norm(sd, p + ".norm", flat)
    if mask is not None:
        n = n * mask[:, :, None]
    qkv = np.einsum("oc,bct->bot", sd[p + ".qkv.weight"][:, :, 0], n)
    qkv = qkv + sd[p + ".qkv.bias"][None, :, None]
    length, ch = flat.shape[-1], c // heads
    if new_order:  # QKVAttention: chunk q, k, v, then split heads
        q, k, v = np.split(qkv, 3, axis=1)
        q, k, v = (a.reshape(b * heads, ch, length) for a in (q, k, v))
    else:  # QKVAttentionLegacy: split heads, then q, k, v
        q, k, v = np.split(qkv.reshape(b * heads, 3 * ch, length), 3, axis=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = _softmax(np.einsum("bct,bcs->bts", q * scale, k * scale))
    a = np.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)
    out = np.einsum("oc,bct->bot", sd[p + ".proj_out.weight"][:, :, 0], a)
    out = out + sd[p + ".proj_out.bias"][None, :, None]
    return (flat + out).reshape(b, c, h, w)


def _timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half)
    args = t[:, None].astype(np.float64) * freqs[None]
    return np.concatenate([np.cos(args), np.sin(args)], axis=-1)


def forward(sd, o, x, t, y=None, masks=None):
    """x: NCHW float; t: [B] timesteps; y: [B] labels or None. `masks(channels, block) -> [B, C]`
    (or None) gives the mask of routed block `block` (ResBlocks and attention blocks counted
    in order) with that many input channels."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    emb = _timestep_embedding(np.asarray(t), o["model_channels"])
    emb = emb @ sd["time_embed.0.weight"].T + sd["time_embed.0.bias"]
    emb = _silu(emb) @ sd["time_embed.2.weight"].T + sd["time_embed.2.bias"]
    if o["num_classes"] is not None:
        emb = emb + sd["label_emb.weight"][np.asarray(y)]
    inputs, middle, outputs, _ = structure(o)
    routed = iter(range(10**6))

    def run(layer, h):
        kind, p, cin, _, heads = layer
        mask = None
        if kind in ("res", "resup", "resdown", "attn"):
            block = next(routed)
            mask = masks(cin, block) if masks is not None else None
        if kind in ("res", "resup", "resdown"):
            updown = {"res": "", "resup": "up", "resdown": "down"}[kind]
            return _resblock(sd, p, h, emb, o, updown, mask)
        if kind == "attn":
            return _attention(sd, p, h, heads, o["use_new_attention_order"], mask)
        if kind == "down":
            return _conv2d(sd, p + ".op", h, stride=2)
        if kind == "up":
            return _conv2d(sd, p + ".conv", _up(h))
        return _conv2d(sd, p, h)

    h, hs = np.asarray(x, np.float64), []
    for block in inputs:
        for layer in block:
            h = run(layer, h)
        hs.append(h)
    for layer in middle:
        h = run(layer, h)
    for block in outputs:
        h = np.concatenate([h, hs.pop()], axis=1)
        for layer in block:
            h = run(layer, h)
    return _conv2d(sd, "out.2", _silu(_group_norm(sd, "out.0", h)))
