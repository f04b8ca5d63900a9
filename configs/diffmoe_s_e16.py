"""DiffMoE-S-E16 (DiT-S/2 backbone, DiffMoE mixtures of 16 DiT-MLP experts in the odd
blocks, batch-level global token pool, capacity predictor) on ImageNet 256x256 SD latents
(sd-vae-ft-mse), class-conditional: DiffMoE paper Table 1 / Table 4 (139M total parameters).

    --config=configs/diffmoe_s_e16.py         rectified flow (DiffMoE-S-E16-Flow)
    --config=configs/diffmoe_s_e16.py:ddpm    DDPM objective (DiffMoE-S-E16-DDPM)
"""
from switch_dit_jax.config_base import mixture_config


def get_config(objective: str = "flow"):
    config = mixture_config("DiT-S/2", "diffmoe", 16, objective)
    config.model.num_heads = 16  # the paper's S-E16 config uses 16 heads
    return config
