"""Dense-DiT-XXXL (depth 36, width 1440, 16 heads: 1353M) under the DiffMoE paper's recipe:
the 3x dense row of its Table 5 (run it with :heun125, as that table's ODE rows). The paper
gives only the parameter count; this shape reproduces it (config_recipes.DENSE_SIZES).

Objective and sampling protocol (config argument; all guided rows use CFG 1.5):
    :flow (default) = :euler250   rectified flow, Euler 250 steps (Tables 3, 4, 8, 10)
    :heun125                      rectified flow, Heun 125 steps (SOTA rows, Tables 2, 5)
    :ddpm                         IDDPM, 250 DDPM steps, CFG on the first 3 latent channels
"""
from switch_dit_jax.config_recipes import dense_config


def get_config(objective: str = "flow"):
    return dense_config("XXXL", objective)
