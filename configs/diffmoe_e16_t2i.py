"""DiffMoE-E16-T2I-Flow (DiffMoE §3.3, Table 7, Figure 5): 16-expert DiffMoE layers in the odd
blocks of the T2I backbone of configs/dense_t2i.py (depth 24, width 1536, 24 heads): 4.625B
parameters, 1.226B activated at C = 1 — the paper's 4.6B / 1.2B.
Objective (config argument): :flow (default, Euler 250), :heun125, :ddpm.
"""
from switch_dit_jax.config_recipes import T2I_SIZE, mixture_config, use_text_conditioning


def get_config(objective: str = "flow"):
    c = mixture_config("DiT-B/2", "diffmoe", 16, objective)
    c.model.name = "custom"
    c.model.depth, c.model.hidden_size, c.model.num_heads = T2I_SIZE
    c.model.patch_size = 2
    return use_text_conditioning(c)
