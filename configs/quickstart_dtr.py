"""Quickstart with DTR: the quickstart DiT with fixed per-timestep sliding-window channel masks
(alpha = 4, beta = 0.8) in every block, on the embedded 8x8 digits (CPU, minutes). DTR adds no
parameters; the step budget is that of configs/quickstart_switchdit.py, so the two (and the DiT
quickstart at the same num_steps) can be compared: benchmarks/compare_quickstart.py.
"""
import os

from switch_dit_jax.config_base import load_config


def get_config():
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      "quickstart.py"))
    config.model.routing.kind = "dtr"
    config.model.routing.alpha = 4.0
    config.model.routing.beta = 0.8
    config.train.num_steps = 1500
    config.train.ema_decay = 0.995  # the EMA must forget the random init within 1500 steps
    config.train.checkpoint_every = 500
    config.train.sample_every = 500
    return config
