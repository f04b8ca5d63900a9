"""Switch-DiT Table 3 (MTL methods on FFHQ 256x256, DiT-B, unconditional), one row per config
string: dit 12.93, p2 10.08, min_snr 9.73, ant_uw 9.30, dtr 8.82, switchdit 8.53 (FID-10K).

    python -m switch_dit_jax.main --config=configs/switchdit_table3.py:ant_uw ...
"""
from switch_dit_jax.config_base import get_base_config

ROWS = ("dit", "p2", "min_snr", "ant_uw", "dtr", "switchdit")


def get_config(row: str = "switchdit"):
    if row not in ROWS:
        raise ValueError(f"unknown Table 3 row {row!r}; use one of {list(ROWS)}.")
    config = get_base_config()
    config.model.name = "DiT-B/2"
    config.model.num_classes = 1          # FFHQ: unconditional
    config.model.class_dropout_prob = 0.0
    config.data.name = "latents"          # FFHQ-256 latents: --config.data.dir=...
    config.diffusion.schedule = "cosine"
    config.sample.cfg_scale = 1.0
    if row in ("p2", "min_snr", "ant_uw"):
        config.loss.weighting = row       # P2 (gamma 1, k 1), Min-SNR-5, ANT-UW (8 clusters)
    elif row == "dtr":
        config.model.routing.kind = "dtr"
    elif row == "switchdit":
        config.model.routing.kind = "switch"
    return config
