"""Quickstart with DiffMoE: the quickstart DiT with 4-expert DiffMoE layers in its odd blocks,
trained with the rectified-flow objective on the embedded digits (CPU, minutes).

Each step pools the batch's 128 x 4 tokens; every expert takes its top 128 (C_train = 1).
Afterwards `python -m switch_dit_jax.analysis.capacity --config=configs/quickstart_diffmoe.py
--workdir=DIR` plots the predicted capacity of each layer over the sampling steps.
"""
import os

from switch_dit_jax.config_base import load_config
from switch_dit_jax.config_recipes import use_flow_objective


def get_config():
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      "quickstart.py"))
    config.model.ffn.kind = "diffmoe"
    config.model.ffn.num_experts = 4
    config = use_flow_objective(config, "heun125")
    config.sample.num_steps = 50  # Heun: 100 network evaluations, as the quickstart's DDPM
    return config
