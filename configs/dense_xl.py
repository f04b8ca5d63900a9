"""Dense-DiT-XL (DiT-XL/2, 675M) under the DiffMoE paper's training recipe: the 1.5x dense
reference of its Tables 3 and 5 (and, with :heun125, the SiT-XL comparison of Table 2).

Objective and sampling protocol (config argument; all guided rows use CFG 1.5):
    :flow (default) = :euler250   rectified flow, Euler 250 steps (Tables 3, 4, 8, 10)
    :heun125                      rectified flow, Heun 125 steps (SOTA rows, Tables 2, 5)
    :ddpm                         IDDPM, 250 DDPM steps, CFG on the first 3 latent channels
"""
from switch_dit_jax.config_recipes import dense_config


def get_config(objective: str = "flow"):
    return dense_config("XL", objective)
