"""ADM on FFHQ 64x64 pixels, unconditional (DTR Table 1, right half: ADM 3.12 FID, ADM + R-TR
3.33, ADM + DTR 2.65), with the paper's recipe (Appendix C): AdamW 1e-4, batch 256, cosine
schedule, T = 1000, 100K iterations, EMA 0.9999, 250 DDPM steps.

Model size: the paper does not give the FFHQ-64 UNet. This config uses ADM's one published
64x64 architecture, the ImageNet-64 UNet (channels 192, multipliers 1,2,3,4, 3 res blocks,
attention at 32/16/8 with 64 head channels, new attention order, scale-shift norm,
resblock_updown, dropout 0.1, learned sigma) without class conditioning (295.1M parameters):
the two Table 1 rows then differ only in data and conditioning, and the DTR code path (masks
per width 192, 384, 576, 768 and their concatenations) is the one ImageNet-64 exercises.

Variants: `configs/adm_ffhq64.py` (ADM), `:dtr` (DTR, α 4, β 0.8), `:random` (R-TR).
Data: --config.data.dir=<uint8 pixel shards of FFHQ, written by
`python -m switch_dit_jax.data.pixels --source=folder --image_dir=/data/ffhq --labels=none
--image_size=64`>.
"""
from switch_dit_jax.config_recipes import adm_imagenet64_unet, adm_pixel_config


def get_config(variant: str = ""):
    c = adm_pixel_config(variant)
    adm_imagenet64_unet(c)
    c.model.num_classes = 1         # unconditional
    c.model.class_dropout_prob = 0.0
    c.train.num_steps = 100_000
    c.sample.cfg_scale = 1.0
    return c
