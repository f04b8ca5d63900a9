"""Import official PyTorch weights as Flax parameters: DiT (facebookresearch/DiT key names)
and ADM (openai/guided-diffusion's UNetModel key names, e.g. `64x64_diffusion.pt`).

The released checkpoints are pickled torch files; convert one to a pickle-free `.npz` once,
where torch is installed:

    python -c "import torch, numpy as np; sd = torch.load('DiT-XL-2-256x256.pt', map_location='cpu'); np.savez('DiT-XL-2-256x256.npz', **{k: v.float().numpy() for k, v in sd.items()})"

(for a DiT training checkpoint, take `sd['ema']`; ADM's released files are plain state dicts:
the same line with `64x64_diffusion.pt`). Then `load_state_dict(path)` reads the `.npz` or a
`.safetensors` file, and `from_torch_state_dict(state_dict, model_config)` (DiT) or
`from_adm_state_dict(state_dict, model_config)` (ADM) returns params.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switch_dit_jax import files
from switch_dit_jax.models import build_model, layers
from switch_dit_jax.models.unet import Layer, UNet

Transform = Callable[[np.ndarray], np.ndarray]


def _linear(prefix: str, path: tuple[str, ...]) -> dict[str, tuple[tuple[str, ...], Transform]]:
    """torch Linear weight [out, in] -> Flax kernel [in, out]; bias as is."""
    return {f"{prefix}.weight": (path + ("kernel",), lambda w: w.T),
            f"{prefix}.bias": (path + ("bias",), lambda b: b)}


def official_key_map(depth: int, num_classes: int) -> dict[str, tuple[tuple[str, ...], Transform]]:
    """Official key -> (Flax param path, transform), for every key except `pos_embed`."""
    table = {
        "x_embedder.proj.weight": (("x_embedder", "proj", "kernel"),
                                   lambda w: w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
        "x_embedder.proj.bias": (("x_embedder", "proj", "bias"), lambda b: b),
    }
    table.update(_linear("t_embedder.mlp.0", ("t_embedder", "mlp_0")))
    table.update(_linear("t_embedder.mlp.2", ("t_embedder", "mlp_2")))
    # Unconditional models (num_classes == 1) have the official one-row table too.
    table["y_embedder.embedding_table.weight"] = (("y_embedder", "embedding_table"), lambda w: w)
    for i in range(depth):
        for torch_name, flax_path in (("attn.qkv", ("attn", "qkv")),
                                      ("attn.proj", ("attn", "proj")),
                                      ("mlp.fc1", ("mlp", "fc1")),
                                      ("mlp.fc2", ("mlp", "fc2")),
                                      ("adaLN_modulation.1", ("adaLN_modulation", "linear"))):
            table.update(_linear(f"blocks.{i}.{torch_name}", (f"blocks_{i}",) + flax_path))
    table.update(_linear("final_layer.linear", ("final_layer", "linear")))
    table.update(_linear("final_layer.adaLN_modulation.1",
                         ("final_layer", "adaLN_modulation", "linear")))
    return table


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `.npz` or `.safetensors` state dict (name -> float32 NumPy array).

    float16, bfloat16 and float64 tensors are cast to float32; integer tensors, NaN or inf
    values, truncated files and pickled (object) arrays are refused naming the file and key.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist; pass the path of a "
                                "converted .npz or .safetensors file (see models/convert.py).")
    if not path.endswith((".safetensors", ".npz")):
        raise ValueError(f"checkpoint file {path!r} is neither .npz nor .safetensors; convert "
                         "the torch .pt file as shown in models/convert.py.")
    return files.load_weights(path, "checkpoint file")


def from_torch_state_dict(state_dict: Mapping[str, Any], model_config) -> dict:
    """Official DiT state dict -> Flax `params` of `build_model(model_config)`.

    Every official key must be used exactly once: a missing, extra or mis-shaped key raises one
    ValueError naming it. The frozen `pos_embed` is not a parameter here; it is checked against
    the table this package computes, so a model built for another input size is caught.
    """
    model = build_model(model_config)
    if isinstance(model, UNet):
        raise ValueError("model.backbone='adm': import guided-diffusion checkpoints with "
                         "from_adm_state_dict, not from_torch_state_dict (DiT).")
    expected = _abstract_params(model)
    table = official_key_map(model.depth, model.num_classes)
    _check_keys(state_dict, table, {"pos_embed"},
                f"a DiT checkpoint for depth={model.depth}, num_classes={model.num_classes}")

    pos = np.asarray(state_dict["pos_embed"], np.float32)
    want_pos = layers.sincos_pos_embed_2d(model.hidden_size, model.grid_size)[None]
    if pos.shape != want_pos.shape:
        raise ValueError(f"state dict key 'pos_embed' has shape {pos.shape} but this model "
                         f"uses {want_pos.shape}; set model.input_size and model.patch_size to "
                         "those of the checkpoint.")
    # The table's entries lie in [-1, 1]: 1e-2 admits a bfloat16 / float16 copy of it (error
    # <= 4e-3) and still refuses any other table, whose entries differ by O(1).
    error = float(np.max(np.abs(pos - want_pos)))
    if not error <= 1e-2:
        raise ValueError(f"state dict key 'pos_embed' differs from this model's 2-D sin-cos "
                         f"table by up to {error:.3g}; the checkpoint uses another position "
                         f"embedding or grid (this model: input_size={model.input_size}, "
                         f"patch_size={model.patch_size}).")

    return _convert(state_dict, table, expected,
                    "the model config (size, patch, channels, classes, learn_sigma)")


def _abstract_params(model) -> dict:
    s = model.input_size
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, s, s, model.in_channels)), jnp.zeros((1,)),
        jnp.zeros((1,), jnp.int32)))
    return nn.unbox(abstract)["params"]


def _check_keys(state_dict, table, also_used: set, what: str) -> None:
    """Every key of `table` (and `also_used`) given, nothing else: one sentence naming one."""
    given = set(state_dict)
    missing = sorted((set(table) | also_used) - given)
    extra = sorted(given - set(table) - also_used)
    if missing:
        raise ValueError(f"state dict is missing official key {missing[0]!r} "
                         f"({len(missing)} missing in all); is it {what}?")
    if extra:
        raise ValueError(f"state dict has unexpected key {extra[0]!r} ({len(extra)} unexpected "
                         "in all); it does not belong to this model config.")


def _convert(state_dict, table, expected, hint: str) -> dict:
    params: dict = {}
    for key, (path, transform) in table.items():
        value = transform(np.asarray(state_dict[key], np.float32))
        want = expected
        for part in path:
            want = want[part]
        if value.shape != tuple(want.shape):
            raise ValueError(f"state dict key {key!r} converts to shape {value.shape} but the "
                             f"model expects {tuple(want.shape)} at {'/'.join(path)}; check "
                             f"{hint}.")
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(value)
    return params


# ----------------------------------------------------------------------------- ADM


def _conv(prefix: str, path: tuple[str, ...]) -> dict[str, tuple[tuple[str, ...], Transform]]:
    """torch Conv2d weight OIHW -> Flax HWIO kernel; bias as is."""
    return {f"{prefix}.weight": (path + ("kernel",), lambda w: w.transpose(2, 3, 1, 0)),
            f"{prefix}.bias": (path + ("bias",), lambda b: b)}


def _conv1x1_as_linear(prefix: str, path: tuple[str, ...]):
    """torch Conv1d(kernel 1) weight [out, in, 1] -> Flax Dense kernel [in, out]."""
    return {f"{prefix}.weight": (path + ("kernel",), lambda w: w[:, :, 0].T),
            f"{prefix}.bias": (path + ("bias",), lambda b: b)}


def _norm(prefix: str, path: tuple[str, ...]):
    return {f"{prefix}.weight": (path + ("scale",), lambda w: w),
            f"{prefix}.bias": (path + ("bias",), lambda b: b)}


def _adm_layer(layer: Layer, torch_prefix: str, flax_name: str) -> dict:
    """The keys of one guided-diffusion layer (torch_prefix e.g. 'input_blocks.4.1')."""
    f = (flax_name,)
    if layer.kind == "res":
        table = {**_norm(f"{torch_prefix}.in_layers.0", f + ("in_norm",)),
                 **_conv(f"{torch_prefix}.in_layers.2", f + ("in_conv",)),
                 **_linear(f"{torch_prefix}.emb_layers.1", f + ("emb_proj",)),
                 **_norm(f"{torch_prefix}.out_layers.0", f + ("out_norm",)),
                 **_conv(f"{torch_prefix}.out_layers.3", f + ("out_conv",))}
        if layer.out_channels != layer.channels:
            table.update(_conv(f"{torch_prefix}.skip_connection", f + ("skip_connection",)))
        return table
    if layer.kind == "attn":
        return {**_norm(f"{torch_prefix}.norm", f + ("norm",)),
                **_conv1x1_as_linear(f"{torch_prefix}.qkv", f + ("qkv",)),
                **_conv1x1_as_linear(f"{torch_prefix}.proj_out", f + ("proj_out",))}
    if layer.kind == "down":
        return _conv(f"{torch_prefix}.op", (f"{flax_name}_op",))
    if layer.kind == "up":
        return _conv(f"{torch_prefix}.conv", (f"{flax_name}_conv",))
    return _conv(torch_prefix, f)


def adm_key_map(model: UNet) -> dict[str, tuple[tuple[str, ...], Transform]]:
    """guided-diffusion UNetModel key -> (Flax param path, transform), for every key."""
    layout = model.layout()
    table = {**_linear("time_embed.0", ("time_embed_0",)),
             **_linear("time_embed.2", ("time_embed_2",))}
    if model.num_classes > 1:
        table["label_emb.weight"] = (("label_emb", "embedding"), lambda w: w)
    for i, block in enumerate(layout.input_blocks):
        for j, layer in enumerate(block):
            table.update(_adm_layer(layer, f"input_blocks.{i}.{j}", f"input_blocks_{i}_{j}"))
    for j, layer in enumerate(layout.middle_block):
        table.update(_adm_layer(layer, f"middle_block.{j}", f"middle_block_{j}"))
    for i, block in enumerate(layout.output_blocks):
        for j, layer in enumerate(block):
            table.update(_adm_layer(layer, f"output_blocks.{i}.{j}", f"output_blocks_{i}_{j}"))
    table.update(_norm("out.0", ("out_norm",)))
    table.update(_conv("out.2", ("out_conv",)))
    return table


def from_adm_state_dict(state_dict: Mapping[str, Any], model_config) -> dict:
    """guided-diffusion UNetModel state dict -> Flax `params` of `build_model(model_config)`.

    `model_config` must describe the checkpoint (model.backbone='adm' and its model.unet
    options; the released 64x64 ImageNet model is configs/adm_imagenet64.py:openai). Every key
    is used exactly once: a missing, extra or mis-shaped key raises one ValueError naming it.
    ADM's label table has no "null" row, so a class-conditional import needs
    model.class_dropout_prob=0 (sampling without classifier-free guidance, cfg_scale=1).
    """
    model = build_model(model_config)
    if not isinstance(model, UNet):
        raise ValueError("from_adm_state_dict needs model.backbone='adm' (with model.name="
                         "'ADM'); for DiT checkpoints use from_torch_state_dict.")
    if model.num_classes > 1 and model.class_dropout_prob > 0:
        raise ValueError(f"model.class_dropout_prob={model.class_dropout_prob} adds a null "
                         "class that ADM checkpoints do not have; set "
                         "model.class_dropout_prob=0 (and sample.cfg_scale=1) to import one.")
    table = adm_key_map(model)
    u = model
    _check_keys(state_dict, table, set(),
                f"a guided-diffusion UNet with model_channels={u.model_channels}, "
                f"channel_mult={u.channel_mult}, num_res_blocks={u.num_res_blocks}, "
                f"attention_resolutions={u.attention_resolutions}, "
                f"resblock_updown={u.resblock_updown}, num_classes={u.num_classes}")
    return _convert(state_dict, table, _abstract_params(model),
                    "model.unet (widths, channel_mult, num_res_blocks), model.input_size, "
                    "model.in_channels, model.num_classes and model.learn_sigma")
