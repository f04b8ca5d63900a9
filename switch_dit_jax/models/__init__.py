"""Model construction from a config: `build_model(model_config)`."""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax.core import FrozenDict

from switch_dit_jax.models.attention import ATTENTION_IMPLS, choose_implementation
from switch_dit_jax.models.dit import DIT_MODELS, REMAT_POLICIES, DiT, parse_model_name
from switch_dit_jax.models.moe import MOE_KINDS
from switch_dit_jax.models.switch import ALLOCATIONS, INTEGRATIONS

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# "cdtr" / "ercddt": DTR Table 8's clustered masking baselines (models/dtr.py).
ROUTING_KINDS = ("none", "dtr", "random", "switch", "cdtr", "ercddt")
# Fields of `config.model.routing` (task routing) and their defaults.
ROUTING_DEFAULTS = dict(
    kind="none",                  # "none" | "dtr" (DTR) | "random" (R-TR) | "switch" (Switch-DiT)
    num_tasks=1000,               # T: one task per training timestep
    alpha=4.0,                    # DTR window shift exponent (also Switch-DiT's prior map)
    beta=0.8,                     # DTR / R-TR activated channel fraction
    seed=0,                       # R-TR channels (one table per block) / random allocation
    clusters=8,                   # CDTR / ERCDDT timestep clusters (DTR Table 8: 8)
    num_experts=3,                # Switch-DiT M
    top_k=2,                      # Switch-DiT k
    integration="mask_skip_init",  # "direct" | "mask" | "mask_skip" | "mask_skip_init"
    noisy_gating=False,           # noisy top-k gating (Table 1 ablation)
    allocation="learned",         # "learned" | "random" (Table 5: fixed random allocation)
)

# Fields of `config.model.ffn` (dense MLP or a DiffMoE-paper mixture) and their defaults.
FFN_DEFAULTS = dict(
    kind="mlp",               # "mlp" | "diffmoe" | "token_choice" (TC-DiT) | "expert_choice" (EC-DiT)
    num_experts=16,           # E
    every=2,                  # a mixture in every `every`-th block ...
    first=1,                  # ... starting at this block (1 = the odd blocks, as DiffMoE)
    capacity=1.0,             # C_train (DiffMoE, EC-DiT)
    top_k=1,                  # TC-DiT experts per token
    threshold_decay=0.95,     # DiffMoE threshold EMA
    inference="dynamic",      # DiffMoE inference: "dynamic" (learned τ) | "interval" (constant γ)
                              # | "static" (top int(C·pool/E) tokens per expert, no predictor)
    interval_threshold=0.5,   # γ of the interval search
    static_capacity=1.0,      # C of the static inference (DiffMoE Table 4: 0.9, 0.95, 1)
    swiglu=False,             # SwiGLU experts and dense FFNs (official use_swiglu)
    shared_experts=0,         # official n_shared_experts: an always-on expert (moe.shared_expert)
)

# Fields of `config.model` and their defaults (the DiT-XL/2 ImageNet-256 latent model).
MODEL_DEFAULTS = dict(
    name="DiT-XL/2",          # "DiT-{S,B,L,XL}/{2,4,8}", or "custom" with the four fields below
    depth=None,               # overrides the named size when set
    hidden_size=None,
    num_heads=None,
    patch_size=None,
    head_dim=None,            # attention head width (DiffMoE's option); None = hidden / heads
    input_size=32,            # spatial size H = W of the model input (latent or pixel)
    in_channels=4,            # channels C of the model input
    num_classes=1000,         # 1 = unconditional (one learned label row, as official)
    class_dropout_prob=0.1,   # label dropout for classifier-free guidance
    learn_sigma=True,         # 2C outputs: eps and the interpolation of the variance
    mlp_ratio=4.0,
    compute_dtype="float32",  # "float32" | "bfloat16"; parameters stay float32
    attention_impl="auto",    # "auto" (cuDNN where it applies, else XLA) | "xla" | "cudnn"
    routing=ROUTING_DEFAULTS,  # task routing, see ROUTING_DEFAULTS
    ffn=FFN_DEFAULTS,         # feed-forward networks, see FFN_DEFAULTS
)


def with_defaults(defaults: Mapping[str, Any], given: Mapping[str, Any] | None,
                  label: str) -> dict[str, Any]:
    """`defaults` updated by `given`; a field not in `defaults` is refused by name."""
    cfg, given = dict(defaults), dict(given or {})
    unknown = set(given) - set(cfg)
    if unknown:
        raise ValueError(f"{label} has unknown field(s) {sorted(unknown)}; known fields: "
                         f"{sorted(cfg)}.")
    cfg.update(given)
    return cfg


def resolve_ffn(ffn: Mapping[str, Any] | None) -> dict[str, Any]:
    cfg = with_defaults(FFN_DEFAULTS, ffn, "model.ffn")
    if cfg["kind"] not in MOE_KINDS:
        raise ValueError(f"model.ffn.kind={cfg['kind']!r}; use one of {list(MOE_KINDS)}.")
    if not isinstance(cfg["shared_experts"], int) or cfg["shared_experts"] < 0:
        raise ValueError(f"model.ffn.shared_experts={cfg['shared_experts']!r} must be an "
                         "integer >= 0.")
    for key in ("num_experts", "every", "top_k"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"model.ffn.{key}={cfg[key]!r} must be a positive integer.")
    if cfg["top_k"] > cfg["num_experts"]:
        raise ValueError(f"model.ffn.top_k={cfg['top_k']} exceeds model.ffn.num_experts="
                         f"{cfg['num_experts']}.")
    if not cfg["capacity"] > 0:
        raise ValueError(f"model.ffn.capacity={cfg['capacity']} must be > 0.")
    if cfg["inference"] not in ("dynamic", "interval", "static"):
        raise ValueError(f"model.ffn.inference={cfg['inference']!r}; use 'dynamic', "
                         "'interval' or 'static'.")
    if not 0 < cfg["static_capacity"] <= cfg["num_experts"]:
        raise ValueError(f"model.ffn.static_capacity={cfg['static_capacity']} must be in (0, "
                         f"num_experts={cfg['num_experts']}] (E = every expert takes the whole "
                         "pool).")
    return cfg


def resolve_routing(routing: Mapping[str, Any] | None) -> dict[str, Any]:
    cfg = with_defaults(ROUTING_DEFAULTS, routing, "model.routing")
    if cfg["kind"] not in ROUTING_KINDS:
        raise ValueError(f"model.routing.kind={cfg['kind']!r}; use one of {list(ROUTING_KINDS)}.")
    if not 0.0 < cfg["beta"] <= 1.0:
        raise ValueError(f"model.routing.beta={cfg['beta']} must be in (0, 1].")
    if not isinstance(cfg["num_tasks"], int) or cfg["num_tasks"] < 2:
        raise ValueError(f"model.routing.num_tasks={cfg['num_tasks']!r} must be an integer >= 2 "
                         "(= diffusion.num_timesteps).")
    if not (isinstance(cfg["top_k"], int) and isinstance(cfg["num_experts"], int)
            and 1 <= cfg["top_k"] <= cfg["num_experts"]):
        raise ValueError(f"model.routing.top_k={cfg['top_k']!r} must be an integer in [1, "
                         f"num_experts={cfg['num_experts']!r}].")
    if cfg["integration"] not in INTEGRATIONS:
        raise ValueError(f"model.routing.integration={cfg['integration']!r}; use one of "
                         f"{list(INTEGRATIONS)}.")
    if cfg["allocation"] not in ALLOCATIONS:
        raise ValueError(f"model.routing.allocation={cfg['allocation']!r}; use one of "
                         f"{list(ALLOCATIONS)}.")
    if cfg["allocation"] == "random" and (cfg["num_experts"], cfg["top_k"]) != (3, 2):
        raise ValueError("model.routing.allocation='random' is defined for num_experts=3, "
                         f"top_k=2 (Table 5), not {cfg['num_experts']}, {cfg['top_k']}.")
    return cfg


def resolve_model_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults + named size + explicit overrides, validated; errors name the field."""
    cfg = with_defaults(MODEL_DEFAULTS, model_config, "model config")
    cfg["routing"] = resolve_routing(cfg["routing"])
    cfg["ffn"] = resolve_ffn(cfg["ffn"])
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
    if cfg["head_dim"] is not None and not (isinstance(cfg["head_dim"], int)
                                            and cfg["head_dim"] >= 1):
        raise ValueError(f"model.head_dim={cfg['head_dim']!r} must be None or a positive "
                         "integer.")
    if cfg["head_dim"] is None and cfg["hidden_size"] % cfg["num_heads"]:
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
    if cfg["attention_impl"] is None:  # configs written before "auto" existed
        cfg["attention_impl"] = "auto"
    if cfg["attention_impl"] not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl={cfg['attention_impl']!r}; use one of "
                         f"{list(ATTENTION_IMPLS)}.")
    return cfg


def build_model(model_config: Mapping[str, Any], remat_policy: str = "none") -> DiT:
    """The DiT described by `model_config` (an ml_collections ConfigDict or a dict).

    `remat_policy` (config.train.remat_policy) only changes how training executes the network:
    "none", "full" or "dots_saveable" (see models/dit.py).
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"train.remat_policy={remat_policy!r}; use one of "
                         f"{list(REMAT_POLICIES)}.")
    cfg = resolve_model_config(model_config)
    dtype = COMPUTE_DTYPES[cfg["compute_dtype"]]
    head_dim = cfg["head_dim"] or cfg["hidden_size"] // cfg["num_heads"]
    attention_impl = choose_implementation(cfg["attention_impl"], dtype, head_dim)
    return DiT(
        input_size=cfg["input_size"], in_channels=cfg["in_channels"],
        patch_size=cfg["patch_size"], hidden_size=cfg["hidden_size"], depth=cfg["depth"],
        num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
        num_classes=cfg["num_classes"], class_dropout_prob=cfg["class_dropout_prob"],
        learn_sigma=cfg["learn_sigma"], dtype=dtype,
        attention_impl=attention_impl, remat_policy=remat_policy,
        routing=FrozenDict(cfg["routing"]), ffn=FrozenDict(cfg["ffn"]),
        head_dim=cfg["head_dim"])


__all__ = ["build_model", "resolve_model_config", "DiT", "DIT_MODELS", "MODEL_DEFAULTS",
           "ROUTING_DEFAULTS", "FFN_DEFAULTS"]
