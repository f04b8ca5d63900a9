"""Quickstart for the ADM UNet: a small class-conditional UNet on the embedded 8x8 digits, CPU.

The UNet of configs/adm_imagenet64.py at toy size (32 base channels, two resolutions, one
ResBlock each, attention at 4x4, AdaGN, resblock_updown, new attention order); `:dtr` adds
DTR's masks after every block's GroupNorm. See README "ADM quickstart".
"""
from switch_dit_jax.config_base import get_base_config


def get_config(variant: str = ""):
    config = get_base_config()
    config.model.backbone = "adm"
    config.model.name = "ADM"
    config.model.input_size = 8
    config.model.in_channels = 1
    config.model.num_classes = 10
    config.model.class_dropout_prob = 0.1
    config.model.learn_sigma = True
    u = config.model.unet
    u.model_channels = 32
    u.channel_mult = (1, 2)
    u.num_res_blocks = 1
    u.attention_resolutions = (4,)
    u.num_heads = 2
    u.use_scale_shift_norm = True
    u.resblock_updown = True
    u.use_new_attention_order = True
    if variant not in ("", "dtr"):
        raise ValueError(f"unknown quickstart_adm variant {variant!r}; use ':dtr' or none.")
    config.model.routing.kind = "dtr" if variant == "dtr" else "none"

    config.data.name = "digits"
    config.data.hflip = False          # mirrored digits are other glyphs

    config.train.global_batch_size = 128
    config.train.num_steps = 2000
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 100
    config.train.ema_decay = 0.999
    config.train.log_every = 100
    config.train.checkpoint_every = 1000
    config.train.sample_every = 1000

    config.sample.num_samples = 100
    config.sample.batch_size = 100
    config.sample.num_steps = 100
    config.sample.cfg_scale = 2.0
    config.sample.clip_denoised = True
    return config
