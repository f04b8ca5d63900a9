"""Model construction from a config: `build_model(model_config)`."""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax.core import FrozenDict

from switch_dit_jax.models import schedule
from switch_dit_jax.models.attention import ATTENTION_IMPLS, choose_implementation
from switch_dit_jax.models.dit import DIT_MODELS, REMAT_POLICIES, DiT, parse_model_name
from switch_dit_jax.models.moe import MOE_KINDS
from switch_dit_jax.models.switch import ALLOCATIONS, INTEGRATIONS
from switch_dit_jax.models.unet import DEFAULT_CHANNEL_MULT, NORM_GROUPS, UNet

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# "cdtr" / "ercddt": DTR Table 8's clustered masking baselines (models/dtr.py); "maxroaming":
# its MaxRoaming row (models/roaming.py).
ROUTING_KINDS = ("none", "dtr", "random", "switch", "cdtr", "ercddt", "maxroaming")
# Fields of `config.model.routing` (task routing) and their defaults.
ROUTING_DEFAULTS = dict(
    kind="none",                  # "none" | "dtr" (DTR) | "random" (R-TR) | "switch" (Switch-DiT)
    num_tasks=1000,               # T: one task per training timestep
    alpha=4.0,                    # DTR window shift exponent (also Switch-DiT's prior map)
    beta=0.8,                     # DTR / R-TR activated channel fraction
    seed=0,                       # R-TR channels (one table per block) / random allocation
    clusters=8,                   # CDTR / ERCDDT / MaxRoaming timestep clusters (DTR Table 8: 8)
    roaming_period=1000,          # MaxRoaming: training steps between two channel swaps
    roaming_sample_step=-1,       # MaxRoaming masks outside training: those of this step
                                  # (-1 = after every swap, the partitions training ends with)
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
    ec_inference="static",    # EC-DiT: "static" top-K' | "dynamic" (per-sample predictor + τ)
    capacity_schedule=(),     # DiffMoE (stage_I_iters, stage_II_iters): C = E, then down to C
)

BACKBONES = ("dit", "adm")
ADM_ROUTING_KINDS = ("none", "dtr", "random")
# Fields of `config.model.unet` (the ADM UNet, model.backbone="adm") and their defaults:
# guided-diffusion's `model_and_diffusion_defaults()`.
UNET_DEFAULTS = dict(
    model_channels=128,           # base width (guided-diffusion's num_channels)
    channel_mult=(),              # width multipliers per resolution; () = ADM's by input size
    num_res_blocks=2,             # ResBlocks per resolution
    attention_resolutions=(16, 8),  # feature-map sizes (pixels) with attention after ResBlocks
    num_heads=4,                  # heads per attention block (when num_head_channels == -1)
    num_head_channels=-1,         # channels per head (-1 = use num_heads)
    use_scale_shift_norm=True,    # AdaGN: the timestep embedding scales and shifts the norm
    resblock_updown=False,        # ResBlocks (not plain convs) down- and upsample
    use_new_attention_order=False,  # split q, k, v before heads (QKVAttention)
    dropout=0.0,                  # dropout in every ResBlock
)

# Fields of `config.model` and their defaults (the DiT-XL/2 ImageNet-256 latent model).
MODEL_DEFAULTS = dict(
    backbone="dit",           # "dit" | "adm" (the ADM UNet of models/unet.py, see `unet`)
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
    conditioning="class",     # "class" (label table) | "text" (cross-attention to CLIP tokens)
    text_width=768,           # width of the text tokens (CLIP ViT-L/14: 768)
    text_length=77,           # number of text tokens (CLIP: 77)
    caption_dropout_prob=0.1,  # caption dropout for classifier-free guidance (text models)
    learn_sigma=True,         # 2C outputs: eps and the interpolation of the variance
    mlp_ratio=4.0,
    compute_dtype="float32",  # "float32" | "bfloat16"; parameters stay float32
    attention_impl="auto",    # "auto" (cuDNN where it applies, else XLA) | "xla" | "cudnn"
    routing=ROUTING_DEFAULTS,  # task routing, see ROUTING_DEFAULTS
    ffn=FFN_DEFAULTS,         # feed-forward networks, see FFN_DEFAULTS
    unet=UNET_DEFAULTS,       # the ADM UNet (backbone="adm"), see UNET_DEFAULTS
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
    sched = tuple(cfg["capacity_schedule"] or ())
    if sched and not (len(sched) == 2 and all(isinstance(v, int) for v in sched)
                      and 0 <= sched[0] < sched[1]):
        raise ValueError(f"model.ffn.capacity_schedule={sched!r} must be () or two training "
                         "steps (stage_I_iters, stage_II_iters) with 0 <= stage I < stage II.")
    if sched and cfg["kind"] not in schedule.SCHEDULED_FFNS:
        raise ValueError(f"model.ffn.capacity_schedule={sched!r} applies to model.ffn.kind "
                         f"'diffmoe' or 'expert_choice', not {cfg['kind']!r}; set it to ().")
    cfg["capacity_schedule"] = sched
    if cfg["ec_inference"] not in ("static", "dynamic"):
        raise ValueError(f"model.ffn.ec_inference={cfg['ec_inference']!r}; use 'static' or "
                         "'dynamic'.")
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
    if not (isinstance(cfg["roaming_period"], int) and cfg["roaming_period"] >= 1):
        raise ValueError(f"model.routing.roaming_period={cfg['roaming_period']!r} must be a "
                         "positive integer (training steps between MaxRoaming swaps).")
    if not (isinstance(cfg["roaming_sample_step"], int) and cfg["roaming_sample_step"] >= -1):
        raise ValueError(f"model.routing.roaming_sample_step={cfg['roaming_sample_step']!r} "
                         "must be -1 (after every swap) or a training step >= 0.")
    if cfg["kind"] == "maxroaming" and not 1 <= cfg["clusters"] <= cfg["num_tasks"]:
        raise ValueError(f"model.routing.clusters={cfg['clusters']} must be in [1, num_tasks="
                         f"{cfg['num_tasks']}] (MaxRoaming has one task per timestep cluster).")
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


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def resolve_unet(cfg: dict[str, Any]) -> dict[str, Any]:
    """model.unet with defaults, ADM's channel multipliers filled in, checked against the
    input size (every width a multiple of the 32 GroupNorm groups, heads that divide)."""
    unet = with_defaults(UNET_DEFAULTS, cfg["unet"], "model.unet")
    size = cfg["input_size"]
    mult = tuple(unet["channel_mult"] or ())
    if not mult:
        if size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"model.unet.channel_mult is empty and ADM has no default for "
                             f"model.input_size={size} (it has {sorted(DEFAULT_CHANNEL_MULT)}); "
                             "set model.unet.channel_mult, e.g. (1, 2).")
        mult = DEFAULT_CHANNEL_MULT[size]
    unet["channel_mult"] = mult
    for key in ("model_channels", "num_res_blocks", "num_heads"):
        if not _positive_int(unet[key]):
            raise ValueError(f"model.unet.{key}={unet[key]!r} must be a positive integer.")
    if not all(isinstance(m, (int, float)) and m > 0 for m in mult):
        raise ValueError(f"model.unet.channel_mult={mult!r} must hold positive numbers.")
    widths = [int(m * unet["model_channels"]) for m in mult]
    bad = [w for w in widths if w <= 0 or w % NORM_GROUPS]
    if bad:
        raise ValueError(f"model.unet.channel_mult={mult} with model_channels="
                         f"{unet['model_channels']} gives width {bad[0]}, not a multiple of "
                         f"the {NORM_GROUPS} GroupNorm groups; choose widths divisible by "
                         f"{NORM_GROUPS}.")
    levels = len(mult)
    if size % 2 ** (levels - 1):
        raise ValueError(f"model.input_size={size} cannot be halved {levels - 1} times "
                         f"(model.unet.channel_mult has {levels} levels); use fewer levels "
                         "or an input size divisible by "
                         f"{2 ** (levels - 1)}.")
    resolutions = [size // 2 ** level for level in range(levels)]
    attn = tuple(unet["attention_resolutions"] or ())
    unknown = [r for r in attn if r not in resolutions]
    if unknown:
        raise ValueError(f"model.unet.attention_resolutions has {unknown[0]!r}, which is not a "
                         f"feature-map size of this UNet {resolutions}; pick from those.")
    unet["attention_resolutions"] = attn
    heads_ch = unet["num_head_channels"]
    if heads_ch != -1 and not _positive_int(heads_ch):
        raise ValueError(f"model.unet.num_head_channels={heads_ch!r} must be -1 (use "
                         "num_heads) or a positive integer.")
    attn_widths = [widths[resolutions.index(r)] for r in attn] + [widths[-1]]  # + middle
    split = heads_ch if heads_ch != -1 else unet["num_heads"]
    what = "num_head_channels" if heads_ch != -1 else "num_heads"
    for w in attn_widths:
        if w % split:
            raise ValueError(f"model.unet.{what}={split} does not divide the attention width "
                             f"{w}; choose a divisor of every attention width {attn_widths}.")
    if not 0.0 <= unet["dropout"] < 1.0:
        raise ValueError(f"model.unet.dropout={unet['dropout']} must be in [0, 1).")
    return unet


def _resolve_adm(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg["name"] != "ADM":
        raise ValueError(f"model.name={cfg['name']!r} with model.backbone='adm'; set "
                         "model.name='ADM' (the UNet's size comes from model.unet).")
    if cfg["routing"]["kind"] not in ADM_ROUTING_KINDS:
        raise ValueError(f"model.routing.kind={cfg['routing']['kind']!r} is not defined for the "
                         f"ADM UNet; use one of {list(ADM_ROUTING_KINDS)}.")
    if cfg["ffn"]["kind"] != "mlp":
        raise ValueError(f"model.ffn.kind={cfg['ffn']['kind']!r} needs the DiT backbone; the "
                         "ADM UNet has no FFN mixtures (use model.ffn.kind='mlp').")
    cfg["unet"] = resolve_unet(cfg)
    return cfg


CONDITIONINGS = ("class", "text")


def _check_conditioning(cfg: dict[str, Any]) -> None:
    if cfg["conditioning"] not in CONDITIONINGS:
        raise ValueError(f"model.conditioning={cfg['conditioning']!r}; use one of "
                         f"{list(CONDITIONINGS)}.")
    if cfg["conditioning"] != "text":
        return
    if cfg["backbone"] != "dit":
        raise ValueError(f"model.conditioning='text' needs model.backbone='dit' (the T2I "
                         f"block is a DiT block), not {cfg['backbone']!r}.")
    for key in ("text_width", "text_length"):
        if not _positive_int(cfg[key]):
            raise ValueError(f"model.{key}={cfg[key]!r} must be a positive integer (the text "
                             "encoder's width and token count, 768 and 77 for CLIP ViT-L/14).")
    if not 0.0 <= cfg["caption_dropout_prob"] < 1.0:
        raise ValueError(f"model.caption_dropout_prob={cfg['caption_dropout_prob']} must be in "
                         "[0, 1).")


def resolve_model_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults + named size + explicit overrides, validated; errors name the field."""
    cfg = with_defaults(MODEL_DEFAULTS, model_config, "model config")
    cfg["routing"] = resolve_routing(cfg["routing"])
    cfg["ffn"] = resolve_ffn(cfg["ffn"])
    if cfg["backbone"] not in BACKBONES:
        raise ValueError(f"model.backbone={cfg['backbone']!r}; use one of {list(BACKBONES)}.")
    if cfg["compute_dtype"] not in COMPUTE_DTYPES:
        raise ValueError(f"model.compute_dtype={cfg['compute_dtype']!r}; use one of "
                         f"{list(COMPUTE_DTYPES)}.")
    if cfg["attention_impl"] is None:  # configs written before "auto" existed
        cfg["attention_impl"] = "auto"
    if cfg["attention_impl"] not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl={cfg['attention_impl']!r}; use one of "
                         f"{list(ATTENTION_IMPLS)}.")
    if not isinstance(cfg["num_classes"], int) or cfg["num_classes"] < 1:
        raise ValueError(f"model.num_classes={cfg['num_classes']!r} must be an integer >= 1 "
                         "(1 = unconditional).")
    if not 0.0 <= cfg["class_dropout_prob"] < 1.0:
        raise ValueError(f"model.class_dropout_prob={cfg['class_dropout_prob']} must be in "
                         "[0, 1).")
    _check_conditioning(cfg)
    if cfg["backbone"] == "adm":
        return _resolve_adm(cfg)
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
    return cfg


def build_model(model_config: Mapping[str, Any], remat_policy: str = "none") -> DiT | UNet:
    """The DiT (model.backbone="dit") or ADM UNet ("adm") described by `model_config` (an
    ml_collections ConfigDict or a dict).

    `remat_policy` (config.train.remat_policy) only changes how training executes the network:
    "none", "full" or "dots_saveable" (see models/dit.py).
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"train.remat_policy={remat_policy!r}; use one of "
                         f"{list(REMAT_POLICIES)}.")
    cfg = resolve_model_config(model_config)
    dtype = COMPUTE_DTYPES[cfg["compute_dtype"]]
    if cfg["backbone"] == "adm":
        u = cfg["unet"]
        return UNet(
            input_size=cfg["input_size"], in_channels=cfg["in_channels"],
            model_channels=u["model_channels"], channel_mult=tuple(u["channel_mult"]),
            num_res_blocks=u["num_res_blocks"],
            attention_resolutions=tuple(u["attention_resolutions"]),
            num_heads=u["num_heads"], num_head_channels=u["num_head_channels"],
            use_scale_shift_norm=u["use_scale_shift_norm"],
            resblock_updown=u["resblock_updown"],
            use_new_attention_order=u["use_new_attention_order"], dropout=u["dropout"],
            num_classes=cfg["num_classes"], class_dropout_prob=cfg["class_dropout_prob"],
            null_class=cfg["class_dropout_prob"] > 0,
            learn_sigma=cfg["learn_sigma"], dtype=dtype, attention_impl=cfg["attention_impl"],
            remat_policy=remat_policy, routing=FrozenDict(cfg["routing"]))
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
        head_dim=cfg["head_dim"], conditioning=cfg["conditioning"],
        text_width=cfg["text_width"], text_length=cfg["text_length"],
        caption_dropout_prob=cfg["caption_dropout_prob"])


def example_condition(model, batch: int = 1):
    """A zero condition of `batch` samples in the form `model` takes (for init and shapes):
    class labels, or a text model's {"text", "text_mask"}."""
    if getattr(model, "conditioning", "class") == "text":
        return {"text": jnp.zeros((batch, model.text_length, model.text_width)),
                "text_mask": jnp.ones((batch, model.text_length), bool)}
    return jnp.zeros((batch,), jnp.int32)


__all__ = ["build_model", "example_condition", "resolve_model_config", "DiT", "UNet", "DIT_MODELS", "MODEL_DEFAULTS",
           "ROUTING_DEFAULTS", "FFN_DEFAULTS", "UNET_DEFAULTS"]
