"""DiffMoE-L-E8 (DiT-L/2 backbone, DiffMoE mixtures of 8 DiT-MLP experts in the odd
blocks, batch-level global token pool, capacity predictor) on ImageNet 256x256 SD latents
(sd-vae-ft-mse), class-conditional: DiffMoE paper Table 1 / Table 4 (1.176B total parameters).

Objective and sampling protocol (config argument; all guided rows use CFG 1.5):
    :flow (default) = :euler250   rectified flow, Euler 250 steps (Tables 3, 4, 8, 10)
    :heun125                      rectified flow, Heun 125 steps (SOTA rows, Tables 2, 5)
    :ddpm                         IDDPM, 250 DDPM steps, CFG on the first 3 latent channels
"""
from switch_dit_jax.config_recipes import mixture_config


def get_config(objective: str = "flow"):
    config = mixture_config("DiT-L/2", "diffmoe", 8, objective)
    return config
