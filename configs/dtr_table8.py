"""DTR Table 8 (masking strategy alternatives, DiT-B/2 on FFHQ 256x256, unconditional), one
row per config string: vanilla 10.99, maxroaming 39.90, ercddt 10.13, cdtr 9.61, dtr 7.32 (FID).

    python -m switch_dit_jax.main --config=configs/dtr_table8.py:cdtr ...

CDTR: DTR windows over 8 timestep clusters, each cluster one task. ERCDDT: half the channels
shared by every timestep, the other half cut into 8 segments, one per cluster (models/dtr.py).
MaxRoaming: a random partition of 80% of the channels per cluster (per block) that swaps one
channel for a never-used one every `routing.roaming_period` steps until every channel has been
visited (models/roaming.py); the paper gives neither the task split nor the period, so the 8
clusters follow CDTR and the period is 1000 steps (DiT-B/2: 154 swaps, fixed after 154K steps).
"""
from switch_dit_jax.config_base import get_base_config

ROWS = ("vanilla", "maxroaming", "ercddt", "cdtr", "dtr")


def get_config(row: str = "dtr"):
    if row not in ROWS:
        raise ValueError(f"unknown Table 8 row {row!r}; use one of {list(ROWS)}.")
    config = get_base_config()
    config.model.name = "DiT-B/2"
    config.model.num_classes = 1          # FFHQ: unconditional
    config.model.class_dropout_prob = 0.0
    config.data.name = "latents"          # FFHQ-256 latents: --config.data.dir=...
    config.diffusion.schedule = "cosine"
    config.sample.cfg_scale = 1.0
    if row != "vanilla":
        config.model.routing.kind = row
        config.model.routing.clusters = 8
    return config
