"""TC-DiT-L-E16 (token-choice MoE: top-1 expert per token, unnormalised gates, load-balance
loss 0.01) at the activated parameters of the dense DiT-L: the DiffMoE paper's Table 3 baseline.

Objective and sampling protocol (config argument; all guided rows use CFG 1.5):
    :flow (default) = :euler250   rectified flow, Euler 250 steps (Tables 3, 4, 8, 10)
    :heun125                      rectified flow, Heun 125 steps (SOTA rows, Tables 2, 5)
    :ddpm                         IDDPM, 250 DDPM steps, CFG on the first 3 latent channels
"""
from switch_dit_jax.config_recipes import mixture_config


def get_config(objective: str = "flow"):
    return mixture_config("DiT-L/2", "token_choice", 16, objective)
