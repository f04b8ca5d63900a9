"""DiT-B/2 text-to-image on MS-COCO 256x256 (DTR Table 1, MS-COCO column): DiT 7.70,
DiT+DTR 7.04, R-TR 10.49 FID.

Variants (config argument):
    (none)    DiT-B/2 with the T2I block (cross-attention to CLIP ViT-L/14 tokens)
    :dtr      + DTR masks (alpha 4, beta 0.8)
    :random   + R-TR (random masks, one table per block)
DTR Appendix C recipe: AdamW 1e-4, no weight decay, batch 256, 400K iterations, cosine
schedule, T = 1000, EMA 0.9999, CFG 1.5 (every channel, as the official DTR sampler), 250 DDPM
steps, FID on 50K samples of validation captions (sample.captions_file).
Data: `python -m switch_dit_jax.data.extract --source=coco ...` (README "Text-to-image").
"""
from switch_dit_jax.config_recipes import dtr_config, use_text_conditioning

VARIANTS = {"": "none", "dtr": "dtr", "random": "random"}


def get_config(variant: str = ""):
    if variant not in VARIANTS:
        raise ValueError(f"unknown dit_b_coco variant {variant!r}; use ':dtr', ':random' or "
                         "none.")
    c = dtr_config("DiT-B/2")  # cosine schedule, CFG 1.5 on every channel
    c.model.routing.kind = VARIANTS[variant]
    c.train.num_steps = 400_000
    return use_text_conditioning(c)
