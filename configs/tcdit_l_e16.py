"""TC-DiT-L-E16 (token-choice MoE: top-1 expert per token, unnormalised gates, load-balance
loss 0.01) at the activated parameters of the dense DiT-L: the DiffMoE paper's Table 3 baseline.

    --config=configs/tcdit_l_e16.py (rectified flow)   --config=configs/tcdit_l_e16.py:ddpm
"""
from switch_dit_jax.config_base import mixture_config


def get_config(objective: str = "flow"):
    return mixture_config("DiT-L/2", "token_choice", 16, objective)
