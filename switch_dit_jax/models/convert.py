"""Import official PyTorch DiT weights (facebookresearch/DiT key names) as Flax parameters.

The released checkpoints are pickled torch files; convert one to a pickle-free `.npz` once,
where torch is installed:

    python -c "import torch, numpy as np; sd = torch.load('DiT-XL-2-256x256.pt', map_location='cpu'); np.savez('DiT-XL-2-256x256.npz', **{k: v.float().numpy() for k, v in sd.items()})"

(for a training checkpoint, take `sd['ema']`). Then `load_state_dict(path)` reads the `.npz` or
a `.safetensors` file and `from_torch_state_dict(state_dict, model_config)` returns params.
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
    s = model.input_size
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, s, s, model.in_channels)), jnp.zeros((1,)),
        jnp.zeros((1,), jnp.int32)))
    expected = nn.unbox(abstract)["params"]
    table = official_key_map(model.depth, model.num_classes)

    given = set(state_dict)
    missing = sorted((set(table) | {"pos_embed"}) - given)
    extra = sorted(given - set(table) - {"pos_embed"})
    if missing:
        raise ValueError(f"state dict is missing official key {missing[0]!r} "
                         f"({len(missing)} missing in all); is it a DiT checkpoint for "
                         f"depth={model.depth}, num_classes={model.num_classes}?")
    if extra:
        raise ValueError(f"state dict has unexpected key {extra[0]!r} ({len(extra)} unexpected "
                         "in all); it does not belong to this model config.")

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

    params: dict = {}
    for key, (path, transform) in table.items():
        value = transform(np.asarray(state_dict[key], np.float32))
        want = expected
        for part in path:
            want = want[part]
        if value.shape != tuple(want.shape):
            raise ValueError(f"state dict key {key!r} converts to shape {value.shape} but the "
                             f"model expects {tuple(want.shape)} at {'/'.join(path)}; check "
                             "the model config (size, patch, channels, classes, learn_sigma).")
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(value)
    return params
