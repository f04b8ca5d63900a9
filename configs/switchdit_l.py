"""Switch-DiT-L (DiT-L/2 with a timestep-gated SMoE per block, M=3 experts, top-k=2,
mask+skip+one-vector-init integration, diffusion prior loss lambda_dp=1) on ImageNet 256x256
SD latents, class-conditional (Switch-DiT paper Table 2 / Fig. 5).

The paper's text trains with the cosine schedule (the official example script uses linear:
--config.diffusion.schedule=linear). FFHQ (unconditional): --config.model.num_classes=1 and an
FFHQ latent directory. Ablations: configs/switchdit_table1.py, switchdit_table5.py.
"""
from switch_dit_jax.config_recipes import switchdit_config


def get_config():
    return switchdit_config("DiT-L/2")
