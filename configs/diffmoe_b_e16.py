"""DiffMoE-B-E16 (DiT-B/2 backbone, DiffMoE mixtures of 16 DiT-MLP experts in the odd
blocks, batch-level global token pool, capacity predictor) on ImageNet 256x256 SD latents
(sd-vae-ft-mse), class-conditional: DiffMoE paper Table 1 / Table 4 (555M total parameters).

    --config=configs/diffmoe_b_e16.py         rectified flow (DiffMoE-B-E16-Flow)
    --config=configs/diffmoe_b_e16.py:ddpm    DDPM objective (DiffMoE-B-E16-DDPM)
"""
from switch_dit_jax.config_base import mixture_config


def get_config(objective: str = "flow"):
    config = mixture_config("DiT-B/2", "diffmoe", 16, objective)
    return config
