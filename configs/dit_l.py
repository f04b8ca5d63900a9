"""DiT-L/2 on ImageNet 256x256 as SD-VAE latents (32x32x4), class-conditional: the papers' DiT
baseline (Peebles & Xie 2023; the DiT rows of the Switch-DiT, DTR and DiffMoE tables).

Train from latents written by this package: --config.data.dir=/path/to/imagenet_latents.
Samples as facebookresearch/DiT: CFG 1.5 on the first 3 latent channels, 250 DDPM steps (the
vanilla DiT of the Switch-DiT / DTR code guides every channel: --config.sample.cfg_channels=0).
"""
from switch_dit_jax.config_recipes import dit_config


def get_config():
    config = dit_config("DiT-L/2")  # the registry name; its depth/width/heads come with it
    config.data.name = "latents"     # ArrayRecord latents of ImageNet-256
    return config
