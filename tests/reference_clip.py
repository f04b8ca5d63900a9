"""An independent NumPy (float64) forward of Hugging Face's CLIP towers, read straight from a
state dict in the Hugging Face key layout, for the text-encoder and CLIP-score tests."""
import json
import os

import numpy as np
from safetensors.numpy import load_file, save_file


def read_dir(model_dir):
    """(state dict float64, config dict) of a Hugging Face CLIP directory."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    sd = {k: v.astype(np.float64) for k, v in
          load_file(os.path.join(model_dir, "model.safetensors")).items()}
    return sd, config


def rewrite(model_dir, change):
    """Applies `change(state_dict)` to model_dir/model.safetensors in place."""
    path = os.path.join(model_dir, "model.safetensors")
    sd = load_file(path)
    change(sd)
    save_file(sd, path)


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _act(name, x):
    if name == "quick_gelu":
        return x / (1.0 + np.exp(-1.702 * x))
    from scipy.special import erf
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _linear(sd, key, x):
    y = x @ sd[key + ".weight"].T
    return y + sd[key + ".bias"] if key + ".bias" in sd else y


def encoder(sd, prefix, x, layers, heads, act, causal):
    b, n, d = x.shape
    hd = d // heads
    for i in range(layers):
        p = f"{prefix}.encoder.layers.{i}"
        h = layer_norm(x, sd[p + ".layer_norm1.weight"], sd[p + ".layer_norm1.bias"])
        q, k, v = (_linear(sd, f"{p}.self_attn.{m}_proj", h).reshape(b, n, heads, hd)
                   for m in "qkv")
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        if causal:
            s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", s, v).reshape(b, n, d)
        x = x + _linear(sd, f"{p}.self_attn.out_proj", o)
        h = layer_norm(x, sd[p + ".layer_norm2.weight"], sd[p + ".layer_norm2.bias"])
        x = x + _linear(sd, f"{p}.mlp.fc2", _act(act, _linear(sd, f"{p}.mlp.fc1", h)))
    return x


def text_sections(config):
    return config.get("text_config", config)


def text_hidden(sd, config, ids):
    """last_hidden_state [B, L, D] of CLIPTextModel."""
    c = text_sections(config)
    e = "text_model.embeddings"
    x = sd[f"{e}.token_embedding.weight"][ids] + sd[f"{e}.position_embedding.weight"][
        : ids.shape[1]]
    x = encoder(sd, "text_model", x, c["num_hidden_layers"], c["num_attention_heads"],
                c["hidden_act"], causal=True)
    return layer_norm(x, sd["text_model.final_layer_norm.weight"],
                      sd["text_model.final_layer_norm.bias"])


def text_embeds(sd, config, ids):
    """CLIPModel.get_text_features: the EOS state (HF's rule), projected."""
    c = text_sections(config)
    hidden = text_hidden(sd, config, ids)
    if c["eos_token_id"] == 2:
        where = ids.argmax(-1)
    else:
        where = np.array([list(row).index(c["eos_token_id"]) for row in ids])
    return hidden[np.arange(len(ids)), where] @ sd["text_projection.weight"].T


def image_embeds(sd, config, pixels):
    """CLIPModel.get_image_features of normalised NHWC pixels."""
    c = config["vision_config"]
    e, p = "vision_model.embeddings", c["patch_size"]
    b, s, _, ch = pixels.shape
    g = s // p
    patches = pixels.reshape(b, g, p, g, p, ch).transpose(0, 1, 3, 5, 2, 4).reshape(b, g * g, -1)
    w = sd[f"{e}.patch_embedding.weight"]  # [D, C, p, p]
    x = patches @ w.reshape(w.shape[0], -1).T
    cls = np.broadcast_to(sd[f"{e}.class_embedding"], (b, 1, w.shape[0]))
    x = np.concatenate([cls, x], 1) + sd[f"{e}.position_embedding.weight"]
    x = layer_norm(x, sd["vision_model.pre_layrnorm.weight"], sd["vision_model.pre_layrnorm.bias"])
    x = encoder(sd, "vision_model", x, c["num_hidden_layers"], c["num_attention_heads"],
                c["hidden_act"], causal=False)
    pooled = layer_norm(x[:, 0], sd["vision_model.post_layernorm.weight"],
                        sd["vision_model.post_layernorm.bias"])
    return pooled @ sd["visual_projection.weight"].T
