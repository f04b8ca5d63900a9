"""ADM on ImageNet 64x64 pixels, class-conditional (DTR Table 1, right half: ADM 6.34 FID,
ADM + R-TR 7.34, ADM + DTR 4.91), with the paper's recipe (Appendix C): AdamW 1e-4, batch
256, cosine schedule, T = 1000, 400K iterations, EMA 0.9999, 250 DDPM steps, CFG 1.5.

The UNet is ADM's published 64x64 model (channels 192, multipliers 1,2,3,4, 3 res blocks,
attention at 32/16/8 with 64 head channels, new attention order, scale-shift norm,
resblock_updown, dropout 0.1, learned sigma: 295.9M parameters plus the CFG null-class row).
Label dropout 0.1 trains the null class that classifier-free guidance needs.

Variants: `configs/adm_imagenet64.py` (ADM), `:dtr` (DTR, α 4, β 0.8), `:random` (R-TR),
`:openai` (the released `64x64_diffusion.pt` as it is: no null class, so no CFG; import it
with models.convert.from_adm_state_dict, see README).
Data: --config.data.dir=<uint8 pixel shards of ImageNet train, written by
`python -m switch_dit_jax.data.pixels --source=folder --image_dir=.../train --image_size=64`>.
"""
from switch_dit_jax.config_recipes import adm_imagenet64_unet, adm_pixel_config


def get_config(variant: str = ""):
    c = adm_pixel_config("" if variant == "openai" else variant)
    adm_imagenet64_unet(c)
    c.model.num_classes = 1000
    c.model.class_dropout_prob = 0.1
    c.train.num_steps = 400_000
    c.sample.cfg_scale = 1.5
    if variant == "openai":
        c.model.class_dropout_prob = 0.0  # ADM's label table has 1000 rows, no null class
        c.sample.cfg_scale = 1.0
    return c
