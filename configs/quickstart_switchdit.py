"""Quickstart with Switch-DiT: the quickstart DiT (depth 4, width 128, patch 4) with a
timestep-gated SMoE per block (M = 3 experts, top-k = 2, mask + skip + one-vector init) and the
diffusion prior loss (lambda_dp = 1), on the embedded 8x8 digits (CPU, minutes).

With 4 blocks the prior map has N·M = 12 expert columns and a window of k·N = 8 per timestep.
Fewer steps than configs/quickstart.py: every Switch-DiT step also gates all T = 1000 timesteps
and solves the prior's assignment, and the digits are legible well before 3000 steps. Afterwards

    python -m switch_dit_jax.analysis.routing --config=configs/quickstart_switchdit.py --workdir=DIR

draws the learned gates next to the prior (gate_vs_prior.png) and the experts each block uses
along the denoising path (denoising_paths.png) in DIR/analysis/.
"""
import os

from switch_dit_jax.config_base import load_config


def get_config():
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      "quickstart.py"))
    r = config.model.routing
    r.kind = "switch"
    r.num_experts = 3
    r.top_k = 2
    r.integration = "mask_skip_init"
    config.loss.prior_weight = 1.0
    config.train.num_steps = 1500
    config.train.ema_decay = 0.995  # the EMA must forget the random init within 1500 steps
    config.train.checkpoint_every = 500
    config.train.sample_every = 500
    return config
