"""TC-DiT-L-E16 (token-choice MoE: top-1 expert per token, unnormalised gates, load-balance
loss 0.01) at the activated parameters of the dense DiT-L: the DiffMoE paper's Table 3 baseline.

    --config=configs/tcdit_l_e16.py (rectified flow)   --config=configs/tcdit_l_e16.py:ddpm
"""
from switch_dit_jax.config_base import get_base_config


def get_config(objective: str = "flow"):
    if objective not in ("flow", "ddpm"):
        raise ValueError(f"unknown objective {objective!r}; use 'flow' or 'ddpm'.")
    config = get_base_config()
    config.model.name = "DiT-L/2"
    config.model.ffn.kind = "token_choice"
    config.model.ffn.num_experts = 16
    config.model.ffn.top_k = 1
    config.loss.load_balance_weight = 0.01
    config.data.name = "latents"
    if objective == "flow":
        config.diffusion.objective = "flow"
        config.model.learn_sigma = False
        config.sample.sampler = "heun"
        config.sample.num_steps = 125
    return config
