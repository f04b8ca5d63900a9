"""Dense-DiT-L (DiT-L/2 with dense MLPs) under the DiffMoE paper's training recipe: the dense
reference of its Table 3 at equal activated parameters (C_train = 1 mixtures process each token
once, as this MLP does).

    --config=configs/dense_l.py (rectified flow)   --config=configs/dense_l.py:ddpm
"""
from switch_dit_jax.config_base import get_base_config


def get_config(objective: str = "flow"):
    if objective not in ("flow", "ddpm"):
        raise ValueError(f"unknown objective {objective!r}; use 'flow' or 'ddpm'.")
    config = get_base_config()
    config.model.name = "DiT-L/2"
    config.data.name = "latents"
    if objective == "flow":
        config.diffusion.objective = "flow"
        config.model.learn_sigma = False
        config.sample.sampler = "heun"
        config.sample.num_steps = 125
    return config
