"""The tiny SD-VAE of the extraction tests: its architecture, weights saved to disk, the
keyword arguments that make `extract` load it, and its posterior computed directly."""
import os

import jax

from switch_dit_jax import vae as vae_lib

TINY_VAE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=4,
                latent_channels=4)
# extract()'s defaults already match layers_per_block and latent_channels.
EXTRACT_ARGS = dict(vae_block_out_channels=TINY_VAE["block_out_channels"],
                    vae_norm_num_groups=TINY_VAE["norm_num_groups"])


def save_tiny_vae(directory):
    """(model, path of its diffusers safetensors in `directory`), freshly initialised."""
    model = vae_lib.build_autoencoder(**TINY_VAE)
    path = os.path.join(str(directory), "vae.safetensors")
    return model, vae_lib.save_diffusers(vae_lib.numpy_params(model), path)


def encode(weights, x):
    """The posterior (mean, std) of images x under the VAE at `weights`, not via extraction."""
    model, params = vae_lib.load_vae(weights, **TINY_VAE)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
    return jax.device_get(fn(params, x))
