"""Dense-DiT-L (DiT-L/2 with dense MLPs) under the DiffMoE paper's training recipe: the dense
reference of its Table 3 at equal activated parameters (C_train = 1 mixtures process each token
once, as this MLP does).

    --config=configs/dense_l.py (rectified flow)   --config=configs/dense_l.py:ddpm
"""
from switch_dit_jax.config_base import get_base_config, use_flow_objective


def get_config(objective: str = "flow"):
    config = get_base_config()
    config.model.name = "DiT-L/2"
    return use_flow_objective(config, objective)
