"""Model construction from a config: `build_model(model_config)`."""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from switch_dit_jax.models.dit import DIT_MODELS, DiT, parse_model_name

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLS = (None, "xla", "cudnn")

# Fields of `config.model` and their defaults (the DiT-XL/2 ImageNet-256 latent model).
MODEL_DEFAULTS = dict(
    name="DiT-XL/2",          # "DiT-{S,B,L,XL}/{2,4,8}", or "custom" with the four fields below
    depth=None,               # overrides the named size when set
    hidden_size=None,
    num_heads=None,
    patch_size=None,
    input_size=32,            # spatial size H = W of the model input (latent or pixel)
    in_channels=4,            # channels C of the model input
    num_classes=1000,         # 1 = unconditional (no label embedding)
    class_dropout_prob=0.1,   # label dropout for classifier-free guidance
    learn_sigma=True,         # 2C outputs: eps and the interpolation of the variance
    mlp_ratio=4.0,
    compute_dtype="float32",  # "float32" | "bfloat16"; parameters stay float32
    attention_impl=None,      # None (XLA decides) | "xla" | "cudnn"
    remat=False,              # rematerialise each block in the backward pass (saves memory)
)


def resolve_model_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults + named size + explicit overrides, validated; errors name the field."""
    cfg = dict(MODEL_DEFAULTS)
    unknown = set(model_config) - set(cfg)
    if unknown:
        raise ValueError(f"model config has unknown field(s) {sorted(unknown)}; known fields: "
                         f"{sorted(cfg)}.")
    cfg.update({k: v for k, v in dict(model_config).items()})
    sizes = {} if cfg["name"] == "custom" else parse_model_name(cfg["name"])
    for key in ("depth", "hidden_size", "num_heads", "patch_size"):
        if cfg[key] is None:
            if key not in sizes:
                raise ValueError(f"model.{key} must be set when model.name='custom'.")
            cfg[key] = sizes[key]
        if not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise ValueError(f"model.{key}={cfg[key]!r} must be a positive integer.")
    if cfg["input_size"] % cfg["patch_size"]:
        raise ValueError(f"model.patch_size={cfg['patch_size']} does not divide "
                         f"model.input_size={cfg['input_size']}; choose a patch size that "
                         "divides the input size.")
    if cfg["hidden_size"] % cfg["num_heads"]:
        raise ValueError(f"model.num_heads={cfg['num_heads']} does not divide "
                         f"model.hidden_size={cfg['hidden_size']}.")
    if cfg["hidden_size"] % 4:
        raise ValueError(f"model.hidden_size={cfg['hidden_size']} must be a multiple of 4 "
                         "(2-D sin-cos position embedding).")
    if not isinstance(cfg["num_classes"], int) or cfg["num_classes"] < 1:
        raise ValueError(f"model.num_classes={cfg['num_classes']!r} must be an integer >= 1 "
                         "(1 = unconditional).")
    if not 0.0 <= cfg["class_dropout_prob"] < 1.0:
        raise ValueError(f"model.class_dropout_prob={cfg['class_dropout_prob']} must be in "
                         "[0, 1).")
    if cfg["compute_dtype"] not in COMPUTE_DTYPES:
        raise ValueError(f"model.compute_dtype={cfg['compute_dtype']!r}; use one of "
                         f"{list(COMPUTE_DTYPES)}.")
    if cfg["attention_impl"] not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl={cfg['attention_impl']!r}; use one of "
                         f"{list(ATTENTION_IMPLS)}.")
    return cfg


def build_model(model_config: Mapping[str, Any]) -> DiT:
    """The DiT described by `model_config` (an ml_collections ConfigDict or a dict)."""
    cfg = resolve_model_config(model_config)
    return DiT(
        input_size=cfg["input_size"], in_channels=cfg["in_channels"],
        patch_size=cfg["patch_size"], hidden_size=cfg["hidden_size"], depth=cfg["depth"],
        num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
        num_classes=cfg["num_classes"], class_dropout_prob=cfg["class_dropout_prob"],
        learn_sigma=cfg["learn_sigma"], dtype=COMPUTE_DTYPES[cfg["compute_dtype"]],
        attention_impl=cfg["attention_impl"], remat=cfg["remat"])


__all__ = ["build_model", "resolve_model_config", "DiT", "DIT_MODELS", "MODEL_DEFAULTS"]
