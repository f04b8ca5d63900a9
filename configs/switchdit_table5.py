"""Switch-DiT Table 5 (effect of L_dp, Switch-DiT-B on FFHQ 256x256): random_allocation 7.63,
matching_ldp 7.12 (FID-10K).

    python -m switch_dit_jax.main --config=configs/switchdit_table5.py:random_allocation ...

Random allocation: per block, expert 0 serves every timestep, expert 1 the timesteps where a
random one of the first N columns of the Eq. 7 prior map is active and expert 2 the rest, with
fixed gates 1/k (no learned gate, no L_dp).
"""
from switch_dit_jax.config_base import get_base_config

ROWS = ("random_allocation", "matching_ldp")


def get_config(row: str = "matching_ldp"):
    if row not in ROWS:
        raise ValueError(f"unknown Table 5 row {row!r}; use one of {list(ROWS)}.")
    config = get_base_config()
    config.model.name = "DiT-B/2"
    config.model.num_classes = 1
    config.model.class_dropout_prob = 0.0
    config.data.name = "latents"
    config.diffusion.schedule = "cosine"
    config.sample.cfg_scale = 1.0
    config.model.routing.kind = "switch"
    if row == "random_allocation":
        config.model.routing.allocation = "random"
        config.loss.prior_weight = 0.0
    return config
