"""EC-DiT-L-E16 (expert choice within each sample, K' = int(S/E · C), C = 1)
at the activated parameters of the dense DiT-L: the DiffMoE paper's Table 3 baseline.

Objective and sampling protocol (config argument; all guided rows use CFG 1.5):
    :flow (default) = :euler250   rectified flow, Euler 250 steps (Tables 3, 4, 8, 10)
    :heun125                      rectified flow, Heun 125 steps (SOTA rows, Tables 2, 5)
    :ddpm                         IDDPM, 250 DDPM steps, CFG on the first 3 latent channels
    :dynamic                      Table 8's "Local Dynamic Intra-sample Routing" (FID 23.74):
                                  flow, Euler 250, plus a capacity predictor and thresholds
                                  confined to each sample (model.ffn.ec_inference="dynamic")
"""
from switch_dit_jax.config_recipes import mixture_config


def get_config(objective: str = "flow"):
    if objective == "dynamic":
        config = mixture_config("DiT-L/2", "expert_choice", 16, "flow")
        config.model.ffn.ec_inference = "dynamic"
        return config
    return mixture_config("DiT-L/2", "expert_choice", 16, objective)
