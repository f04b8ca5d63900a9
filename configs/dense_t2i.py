"""Dense-DiT-T2I-Flow (DiffMoE Table 7 and Figure 5): the 1.2B dense text-to-image baseline.

Size: the paper gives only the parameter counts (1.2B dense; DiffMoE-E16-T2I-Flow 1.2B
activated of 4.6B). Depth 24, width 1536, 24 heads of 64, patch 2, with one T2I cross-attention
(keys and values from 768-wide CLIP tokens) per block gives 1.197B parameters here, and the same
backbone with 16-expert DiffMoE layers in the odd blocks 4.625B total, 1.226B activated: the
paper's 1.2B / 4.6B / 1.2B to its rounding (tests/test_configs.py counts them).
Objective (config argument): :flow (default, Euler 250), :heun125, :ddpm.
"""
from switch_dit_jax.config_recipes import T2I_SIZE, dense_config, use_text_conditioning


def get_config(objective: str = "flow"):
    c = dense_config("B", objective)
    c.model.name = "custom"
    c.model.depth, c.model.hidden_size, c.model.num_heads = T2I_SIZE
    c.model.patch_size = 2
    return use_text_conditioning(c)
