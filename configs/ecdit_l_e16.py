"""EC-DiT-L-E16 (expert choice within each sample, K' = int(S/E · C), C = 1)
at the activated parameters of the dense DiT-L: the DiffMoE paper's Table 3 baseline.

    --config=configs/ecdit_l_e16.py (rectified flow)   --config=configs/ecdit_l_e16.py:ddpm
"""
from switch_dit_jax.config_base import mixture_config


def get_config(objective: str = "flow"):
    return mixture_config("DiT-L/2", "expert_choice", 16, objective)
