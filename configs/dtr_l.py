"""DiT-L/2 + DTR (denoising task routing: fixed per-timestep sliding-window channel masks,
alpha=4, beta=0.8, in every block) on ImageNet 256x256 SD latents, class-conditional
(DTR paper Table 1 / Switch-DiT's DTR rows).

The papers' text trains with the cosine schedule (the official example script uses linear:
--config.diffusion.schedule=linear). FFHQ (unconditional): --config.model.num_classes=1 and an
FFHQ latent directory. R-TR (random routing): --config.model.routing.kind=random.
"""
from switch_dit_jax.config_recipes import dtr_config


def get_config():
    return dtr_config("DiT-L/2")
