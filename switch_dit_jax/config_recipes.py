"""The papers' recipes on top of `config_base.get_base_config()`: DiT, DTR and Switch-DiT on
ImageNet latents, the DiffMoE paper's mixtures, dense sizes and objectives, text-to-image on
MS-COCO, and ADM on pixels. The files in `configs/` call one and name a size or a variant.
"""
import os

from ml_collections import ConfigDict

from switch_dit_jax.config_base import get_base_config


# Classifier-free guidance scale of the three papers' guided results (Switch-DiT, DTR: the
# official eval configs; DiffMoE: "cfg=1.5"). The base default (4.0) is DiT's sample script's.
PAPER_CFG_SCALE = 1.5


def dit_config(model_name: str) -> ConfigDict:
    """DiT on ImageNet latents as facebookresearch/DiT samples it: CFG 1.5 on the first 3 latent
    channels (its forward_with_cfg; DiT-XL/2's FID 2.27 is measured so), 250 DDPM steps."""
    c = get_base_config()
    c.model.name = model_name
    c.sample.cfg_scale = PAPER_CFG_SCALE
    c.sample.cfg_channels = 3
    return c


def dtr_config(model_name: str) -> ConfigDict:
    """DiT + DTR routing (α 4, β 0.8) on ImageNet latents, cosine schedule (the papers' text);
    CFG 1.5 on every channel, as the official DTR sampler."""
    c = get_base_config()
    c.model.name = model_name
    c.model.routing.kind = "dtr"
    c.model.routing.alpha = 4.0
    c.model.routing.beta = 0.8
    c.diffusion.schedule = "cosine"
    c.sample.cfg_scale = PAPER_CFG_SCALE
    return c


def switchdit_config(model_name: str) -> ConfigDict:
    """Switch-DiT (M 3, k 2, mask+skip+init, λ_dp 1) on ImageNet latents, cosine schedule;
    CFG 1.5 on every channel, as the official Switch-DiT sampler."""
    c = get_base_config()
    c.model.name = model_name
    c.model.routing.kind = "switch"
    c.model.routing.num_experts = 3
    c.model.routing.top_k = 2
    c.model.routing.integration = "mask_skip_init"
    c.loss.prior_weight = 1.0
    c.diffusion.schedule = "cosine"
    c.sample.cfg_scale = PAPER_CFG_SCALE
    return c


# The DiffMoE paper's objective and sampling protocol, named by a config's argument:
#   "flow" = "euler250": rectified flow, Euler 250 steps (its baseline Tables 3, 4, 8, 10);
#   "heun125": rectified flow, Heun 125 steps = NFE 250 (its SOTA comparison, Tables 2, 5);
#   "ddpm": IDDPM, 250 DDPM steps.
OBJECTIVES = {"flow": ("flow", "euler", 250), "euler250": ("flow", "euler", 250),
              "heun125": ("flow", "heun", 125), "ddpm": ("gaussian", "ddpm", 250)}


def use_flow_objective(c: ConfigDict, objective: str) -> ConfigDict:
    """One of OBJECTIVES: the objective, its sampler and its step count."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {list(OBJECTIVES)}.")
    kind, sampler, steps = OBJECTIVES[objective]
    c.diffusion.objective = kind
    c.sample.sampler = sampler
    c.sample.num_steps = steps
    if kind == "flow":
        c.model.learn_sigma = False  # a velocity has no variance to learn
    return c


def diffmoe_paper_protocol(c: ConfigDict, objective: str) -> ConfigDict:
    """`use_flow_objective` and the paper's guidance: CFG 1.5; the DDPM models guide only the
    first 3 latent channels (the official forward_with_cfg of Dense-DiT, TC-, EC-DiT and
    DiffMoE), the flow sampler guides every channel."""
    c = use_flow_objective(c, objective)
    c.sample.cfg_scale = PAPER_CFG_SCALE
    c.sample.cfg_channels = 3 if c.diffusion.objective == "gaussian" else 0
    return c


def mixture_config(model_name: str, kind: str, num_experts: int, objective: str) -> ConfigDict:
    """A DiffMoE-paper model: `kind` mixtures of `num_experts` DiT MLPs in the odd blocks."""
    c = get_base_config()
    c.model.name = model_name
    c.model.ffn.kind = kind
    c.model.ffn.num_experts = num_experts
    c.model.ffn.capacity = 1.0  # C_train = 1: the compute of the dense model
    if kind == "token_choice":
        c.model.ffn.top_k = 1
        c.loss.load_balance_weight = 0.01
    return diffmoe_paper_protocol(c, objective)


# Dense-DiT sizes of DiffMoE Table 5 beyond DiT-XL: (depth, width, heads). The paper gives only
# the parameter counts (951M, 1353M); these shapes give 950.9M and 1352.6M (flow, no learned
# sigma), the nearest with a width divisible by 16 heads.
DENSE_SIZES = {"XXL": (32, 1280, 16), "XXXL": (36, 1440, 16)}


def dense_config(size: str, objective: str) -> ConfigDict:
    """Dense-DiT-{S,B,L,XL,XXL,XXXL} (dense MLPs) under the DiffMoE paper's recipe."""
    c = get_base_config()
    if size in DENSE_SIZES:
        c.model.name = "custom"
        c.model.depth, c.model.hidden_size, c.model.num_heads = DENSE_SIZES[size]
        c.model.patch_size = 2
    else:
        c.model.name = f"DiT-{size}/2"
    return diffmoe_paper_protocol(c, objective)


# Prompts of the in-training sample grids of the MS-COCO configs (configs/coco_prompts.txt).
COCO_PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs", "coco_prompts.txt")


# (depth, width, heads) of DiffMoE's T2I models (Dense-DiT-T2I-Flow, DiffMoE-E16-T2I-Flow): the
# paper gives only 1.2B dense / 4.6B total; see configs/dense_t2i.py for the derivation.
T2I_SIZE = (24, 1536, 24)


def use_text_conditioning(c: ConfigDict) -> ConfigDict:
    """Text-to-image on MS-COCO 256x256 SD latents extracted with --source=coco: CLIP ViT-L/14
    text tokens (77 x 768) through every block's cross-attention, caption dropout 0.1 for CFG
    (DTR Appendix C). Pass --config.data.dir (the extracted latents) and
    --config.text.encoder_dir (the CLIP directory, for the prompts of the sample grids)."""
    c.model.conditioning = "text"
    c.model.text_width = 768
    c.model.text_length = 77
    c.model.num_classes = 1
    c.model.caption_dropout_prob = 0.1
    c.data.name = "latents"
    c.sample.prompts = COCO_PROMPTS
    return c


ADM_VARIANTS = {"": "none", "dtr": "dtr", "random": "random"}


def adm_pixel_config(variant: str = "") -> ConfigDict:
    """ADM on 64x64 pixels with DTR Appendix C's recipe: AdamW 1e-4 (no weight decay), batch
    256, cosine schedule, T = 1000, EMA 0.9999, 250 respaced DDPM sampling steps, hflips.
    `variant`: "" (ADM), "dtr" (DTR, α 4, β 0.8) or "random" (R-TR, β 0.8)."""
    if variant not in ADM_VARIANTS:
        raise ValueError(f"unknown ADM variant {variant!r}; use one of "
                         f"{[v for v in ADM_VARIANTS if v]} (or none).")
    c = get_base_config()
    c.model.backbone = "adm"
    c.model.name = "ADM"
    c.model.input_size = 64
    c.model.in_channels = 3
    c.model.learn_sigma = True
    c.model.routing.kind = ADM_VARIANTS[variant]
    c.model.routing.alpha = 4.0
    c.model.routing.beta = 0.8
    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 1000
    c.data.name = "pixels"        # uint8 records from `python -m switch_dit_jax.data.pixels`
    c.data.image_size = 64
    c.data.hflip = True           # records hold each image once; flip at random when read
    c.train.global_batch_size = 256
    c.train.learning_rate = 1e-4
    c.train.weight_decay = 0.0
    c.train.ema_decay = 0.9999
    c.sample.sampler = "ddpm"
    c.sample.num_steps = 250
    c.sample.clip_denoised = True  # pixels live in [-1, 1] (ADM clips x0)
    return c


def adm_imagenet64_unet(c: ConfigDict) -> ConfigDict:
    """ADM's published 64x64 ImageNet UNet (guided-diffusion README's 64x64 model flags)."""
    u = c.model.unet
    u.model_channels = 192
    u.channel_mult = (1, 2, 3, 4)
    u.num_res_blocks = 3
    u.attention_resolutions = (32, 16, 8)
    u.num_head_channels = 64
    u.use_new_attention_order = True
    u.use_scale_shift_norm = True
    u.resblock_updown = True
    u.dropout = 0.1
    return c
