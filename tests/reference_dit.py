"""An independent NumPy forward pass of the official PyTorch DiT, for tests.

Written from facebookresearch/DiT `models.py` semantics, in torch layout (NCHW input, torch
key names, Linear weights [out, in]), sharing no code with the package.
"""
import numpy as np


def _linear(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _silu(x, xp=np):
    return x / (1 + xp.exp(-x))


def _gelu_tanh(x, xp=np):
    return 0.5 * x * (1 + xp.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _layer_norm(x, xp=np):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / xp.sqrt(var + 1e-6)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def pos_embed(embed_dim, grid_size):
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], 1)


def timestep_embed(sd, t, xp=np):
    """t_embedder: sinusoidal features [cos | sin] -> Linear -> SiLU -> Linear."""
    half = 128
    # float32 as in the official code: at t ~ 1000 the phase error is part of the model.
    freqs = xp.exp(-np.float32(np.log(10000)) * xp.arange(half, dtype=np.float32) / half)
    args = t[:, None].astype(np.float32) * freqs[None]
    temb = xp.concatenate([xp.cos(args), xp.sin(args)], -1)
    return _linear(sd, "t_embedder.mlp.2", _silu(_linear(sd, "t_embedder.mlp.0", temb), xp))


def forward(sd, x, t, y, depth, num_heads, patch, out_channels, xp=np, mask=None, ffn=None):
    """x: [N, C, H, W] -> [N, out_channels, H, W].

    `xp` is the array module: NumPy, or jax.numpy to differentiate this forward by plain
    autodiff (tests compare the package's hand-written backward passes against that).
    `mask(i, tokens)` gives block i's routing mask m (DTR / Switch-DiT: the block computes
    (1 - m)·z + Block(m·z)) or None; `ffn(i, h)` gives block i's FFN output, or None for the
    dense `mlp.fc1` / `mlp.fc2` (the MoE families).
    """
    n, c_in, h, w = x.shape
    p, g = patch, h // patch
    weight, bias = sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"]
    patches = x.reshape(n, c_in, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
    tok = patches @ weight.reshape(weight.shape[0], -1).T + bias + sd["pos_embed"][0]

    c = timestep_embed(sd, t, xp)
    if "y_embedder.embedding_table.weight" in sd:
        c = c + sd["y_embedder.embedding_table.weight"][y]

    d = tok.shape[-1]
    hd = d // num_heads
    for i in range(depth):
        b = f"blocks.{i}."
        mods = xp.split(_linear(sd, b + "adaLN_modulation.1", _silu(c, xp)), 6, axis=1)
        sh1, sc1, g1, sh2, sc2, g2 = mods
        m_i = None if mask is None else mask(i, tok)
        if m_i is not None:
            skip, tok = (1 - m_i) * tok, m_i * tok
        a = _modulate(_layer_norm(tok, xp), sh1, sc1)
        qkv = _linear(sd, b + "attn.qkv", a).reshape(n, -1, 3, num_heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * hd ** -0.5, qkv[1], qkv[2]
        att = q @ k.transpose(0, 1, 3, 2)
        att = xp.exp(att - att.max(-1, keepdims=True))
        att = att / att.sum(-1, keepdims=True)
        a = (att @ v).transpose(0, 2, 1, 3).reshape(n, -1, d)
        tok = tok + g1[:, None] * _linear(sd, b + "attn.proj", a)
        m = _modulate(_layer_norm(tok, xp), sh2, sc2)
        routed = None if ffn is None else ffn(i, m)
        if routed is None:
            routed = _linear(sd, b + "mlp.fc2", _gelu_tanh(_linear(sd, b + "mlp.fc1", m), xp))
        tok = tok + g2[:, None] * routed
        if m_i is not None:
            tok = tok + skip
    shift, scale = xp.split(_linear(sd, "final_layer.adaLN_modulation.1", _silu(c, xp)), 2, axis=1)
    out = _linear(sd, "final_layer.linear", _modulate(_layer_norm(tok, xp), shift, scale))
    out = out.reshape(n, g, g, p, p, out_channels)
    return xp.einsum("nhwpqc->nchpwq", out).reshape(n, out_channels, g * p, g * p)


def official_shapes(depth, hidden, in_ch, patch, num_classes, learn_sigma, input_size):
    """name -> shape of the official DiT state dict."""
    d, out = hidden, in_ch * (2 if learn_sigma else 1)
    shapes = {
        "pos_embed": (1, (input_size // patch) ** 2, d),
        "x_embedder.proj.weight": (d, in_ch, patch, patch), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        # LabelEmbedder(num_classes, d, dropout) has num_classes + (dropout > 0) rows, and the
        # official models set dropout 0 when num_classes == 1 (unconditional).
        "y_embedder.embedding_table.weight": (num_classes + (num_classes > 1), d),
        "final_layer.linear.weight": (patch * patch * out, d),
        "final_layer.linear.bias": (patch * patch * out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        })
    return shapes


def random_state_dict(shapes, seed=0, scale=0.05):
    rng = np.random.default_rng(seed)
    sd = {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}
    n_tok, d = shapes["pos_embed"][1:]
    sd["pos_embed"] = pos_embed(d, int(round(n_tok ** 0.5)))[None].astype(np.float32)
    return sd
