"""Import official PyTorch checkpoints of every family as Flax variables, pickle-free.

ADM (openai/guided-diffusion UNetModel, e.g. `64x64_diffusion.pt`, the same conversion line)
imports through `from_adm_state_dict(state_dict, model_config)` (`convert_adm.py`), which
returns the params of a `model.backbone="adm"` config.

Families (`FAMILIES`; key layouts in `convert_families.py`): `dit` (facebookresearch/DiT),
`dense_dit`, `diffmoe`, `tc_dit`, `ec_dit` (KwaiVGI/DiffMoE), `dtr` (byeongjun-park/DTR) and
`switch_dit` (byeongjun-park/Switch-DiT). The released checkpoints are pickled torch files;
convert one to a pickle-free `.npz` once, where torch is installed:

    python -c "import torch, numpy as np; sd = torch.load('DiT-XL-2-256x256.pt', map_location='cpu'); np.savez('DiT-XL-2-256x256.npz', **{k: v.float().numpy() for k, v in sd.items()})"

(for a training checkpoint of the official train.py, take `sd['ema']` for sampling or
`sd['model']` to continue training). Then `load_state_dict(path)` reads the `.npz` or a
`.safetensors` file and

    variables = from_official_state_dict(state_dict, model_config, family)

returns `{"params": ..., "moe_state": ...}` ("moe_state", DiffMoE's thresholds, only where the
model has it) for `build_model(model_config).apply(variables, x, t, y)`. One function per
family does the same: `from_switchdit_state_dict`, `from_dtr_state_dict`,
`from_diffmoe_state_dict`, `from_tcdit_state_dict`, `from_ecdit_state_dict`,
`from_densedit_state_dict`; `from_torch_state_dict` (facebookresearch/DiT) returns the params
alone. Every official key is used exactly once; a missing, unexpected or mis-shaped key, or a
stored table (position embedding, DTR masks, prior map) that differs from the config's, is
refused in one sentence naming it. `python -m switch_dit_jax.train.import_official` saves the
result as a run's checkpoint, to sample, evaluate or continue training with `main`.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np

from switch_dit_jax import files
from switch_dit_jax.errors import UserError
from switch_dit_jax.models import build_model
from switch_dit_jax.models import convert_engine, convert_families
from switch_dit_jax.models.convert_adm import adm_key_map, from_adm_state_dict  # noqa: F401
from switch_dit_jax.models.convert_families import FAMILIES
from switch_dit_jax.models.unet import UNet

Transform = Callable[[np.ndarray], np.ndarray]


def official_key_map(depth: int, num_classes: int) -> dict[str, tuple[tuple[str, ...], Transform]]:
    """facebookresearch/DiT key -> (Flax param path, transform), every key but `pos_embed`."""
    del num_classes  # every DiT has a label table (one row when unconditional, as the official)
    table = convert_families.backbone_table(depth, True)
    return {key: (rule.path, rule.transform) for key, rule in table.items()}


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


def from_official_state_dict(state_dict: Mapping[str, Any], model_config, family: str
                              ) -> dict[str, Any]:
    """An official state dict of `family` -> Flax variables of `build_model(model_config)`.

    The config must describe the trained model (sizes, classes, experts and the blocks that
    hold them, routing tables); see the module docstring for the families.
    """
    model = build_model(model_config)
    if isinstance(model, UNet):
        raise UserError("model.backbone='adm': import guided-diffusion checkpoints with "
                        "from_adm_state_dict, not the DiT families' importers.")
    convert_families.check_config(family, model)
    expected = convert_engine.abstract_variables(model)
    table = convert_families.family_table(family, model, state_dict,
                                          has_labels="y_embedder" in expected["params"])
    return convert_engine.assemble(state_dict, table, expected,
                                   convert_families.describe(family, model))


def from_torch_state_dict(state_dict: Mapping[str, Any], model_config) -> dict:
    """facebookresearch/DiT state dict -> Flax `params` of `build_model(model_config)`."""
    return from_official_state_dict(state_dict, model_config, "dit")["params"]


def from_densedit_state_dict(state_dict: Mapping[str, Any], model_config) -> dict[str, Any]:
    """KwaiVGI/DiffMoE Dense-DiT (`models_DiT.py`) -> variables."""
    return from_official_state_dict(state_dict, model_config, "dense_dit")


def from_dtr_state_dict(state_dict: Mapping[str, Any], model_config) -> dict[str, Any]:
    """byeongjun-park/DTR -> variables (model.routing.kind='dtr')."""
    return from_official_state_dict(state_dict, model_config, "dtr")


def from_switchdit_state_dict(state_dict: Mapping[str, Any], model_config) -> dict[str, Any]:
    """byeongjun-park/Switch-DiT (its DMoE or its DTR routing) -> variables."""
    return from_official_state_dict(state_dict, model_config, "switch_dit")


def from_diffmoe_state_dict(state_dict: Mapping[str, Any], model_config) -> dict[str, Any]:
    """KwaiVGI/DiffMoE DiffMoE (`models_DiffMoE.py`) -> params and moe_state (thresholds)."""
    return from_official_state_dict(state_dict, model_config, "diffmoe")


def from_tcdit_state_dict(state_dict: Mapping[str, Any], model_config) -> dict[str, Any]:
    """KwaiVGI/DiffMoE TC-DiT (`models_TCDiT.py`) -> variables."""
    return from_official_state_dict(state_dict, model_config, "tc_dit")


def from_ecdit_state_dict(state_dict: Mapping[str, Any], model_config) -> dict[str, Any]:
    """KwaiVGI/DiffMoE EC-DiT (`models_ECDiT.py`) -> variables."""
    return from_official_state_dict(state_dict, model_config, "ec_dit")


__all__ = ["FAMILIES", "load_state_dict", "official_key_map", "from_official_state_dict",
           "from_torch_state_dict", "from_densedit_state_dict", "from_dtr_state_dict",
           "from_switchdit_state_dict", "from_diffmoe_state_dict", "from_tcdit_state_dict",
           "from_ecdit_state_dict"]
