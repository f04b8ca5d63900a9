"""DiffMoE-XL-E16 (DiT-XL/2 backbone, DiffMoE mixtures of 16 DiT-MLP experts in the odd
blocks, batch-level global token pool, capacity predictor) on ImageNet 256x256 SD latents
(sd-vae-ft-mse), class-conditional: DiffMoE paper Table 1 / Table 4.

    --config=configs/diffmoe_xl_e16.py         rectified flow (DiffMoE-XL-E16-Flow)
    --config=configs/diffmoe_xl_e16.py:ddpm    DDPM objective (DiffMoE-XL-E16-DDPM)
"""
from switch_dit_jax.config_base import get_base_config


def get_config(objective: str = "flow"):
    if objective not in ("flow", "ddpm"):
        raise ValueError(f"unknown objective {objective!r}; use 'flow' or 'ddpm'.")
    config = get_base_config()
    config.model.name = "DiT-XL/2"
    config.model.ffn.kind = "diffmoe"
    config.model.ffn.num_experts = 16
    config.model.ffn.capacity = 1.0          # C_train = 1: the compute of the dense model
    config.loss.capacity_weight = 1.0
    config.data.name = "latents"
    if objective == "flow":
        config.diffusion.objective = "flow"
        config.model.learn_sigma = False     # the velocity has no variance to learn
        config.sample.sampler = "heun"       # the paper's sampler: Heun, 125 steps (NFE 250)
        config.sample.num_steps = 125
    return config
