"""EC-DiT-L-E16 (expert choice within each sample, K' = int(S/E · C), C = 1)
at the activated parameters of the dense DiT-L: the DiffMoE paper's Table 3 baseline.

    --config=configs/ecdit_l_e16.py (rectified flow)   --config=configs/ecdit_l_e16.py:ddpm
"""
from switch_dit_jax.config_base import get_base_config


def get_config(objective: str = "flow"):
    if objective not in ("flow", "ddpm"):
        raise ValueError(f"unknown objective {objective!r}; use 'flow' or 'ddpm'.")
    config = get_base_config()
    config.model.name = "DiT-L/2"
    config.model.ffn.kind = "expert_choice"
    config.model.ffn.num_experts = 16
    config.model.ffn.capacity = 1.0
    config.data.name = "latents"
    if objective == "flow":
        config.diffusion.objective = "flow"
        config.model.learn_sigma = False
        config.sample.sampler = "heun"
        config.sample.num_steps = 125
    return config
