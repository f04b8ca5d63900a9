"""The Stable Diffusion VAE: Flax model, diffusers weight import, and loading from a config.

    model, params = load_vae("/path/diffusion_pytorch_model.safetensors")
    mean, std = model.apply({"params": params}, images, method="encode")   # [-1, 1] NHWC
    images = model.apply({"params": params}, latents, method="decode")    # unscaled latents
"""
from __future__ import annotations

import functools
import os

from switch_dit_jax.vae.autoencoder import (SD_BLOCK_OUT_CHANNELS, AutoencoderKL,
                                            abstract_params, build_autoencoder, init_params,
                                            numpy_params)
from switch_dit_jax.vae.convert import (VAEWeightsError, check_diffusers, expected_tensors,
                                        load_diffusers, save_diffusers, sha256_file)

__all__ = ["SD_BLOCK_OUT_CHANNELS", "AutoencoderKL", "VAEWeightsError", "abstract_params",
           "architecture_from_config", "build_autoencoder", "check_config", "check_diffusers",
           "expected_tensors", "init_params", "load_diffusers", "load_vae", "load_vae_from_config",
           "numpy_params", "save_diffusers", "sha256_file"]


def load_vae(weights: str, block_out_channels=SD_BLOCK_OUT_CHANNELS, layers_per_block: int = 2,
             norm_num_groups: int = 32, latent_channels: int = 4):
    """(model, params) of a diffusers AutoencoderKL safetensors file; SD 1.x VAE by default."""
    model = build_autoencoder(block_out_channels, layers_per_block, norm_num_groups,
                              latent_channels)
    return model, load_diffusers(weights, model)


def architecture_from_config(vae_config) -> dict:
    """The build_autoencoder keyword arguments of a `config.vae` section."""
    return {"block_out_channels": tuple(int(w) for w in vae_config.block_out_channels),
            "layers_per_block": int(vae_config.layers_per_block),
            "norm_num_groups": int(vae_config.norm_num_groups),
            "latent_channels": int(vae_config.latent_channels)}


@functools.lru_cache(maxsize=2)
def _load_cached(weights: str, mtime: float, arch: tuple):
    del mtime  # part of the cache key only: a rewritten file is read again
    return load_vae(weights, **dict(arch))


def load_vae_from_config(vae_config):
    """(model, params) for `config.vae`, read from disk once per process and file version."""
    arch = architecture_from_config(vae_config)
    weights = os.path.abspath(os.path.expanduser(vae_config.weights))
    mtime = os.path.getmtime(weights) if os.path.isfile(weights) else -1.0
    return _load_cached(weights, mtime, tuple(sorted(arch.items())))


def check_config(config) -> None:
    """Raises for a `config.vae` that could not decode this run's samples; reads only the
    weights file's header, so it is cheap to call before training starts."""
    if config.data.name != "latents" or not config.vae.weights:
        return
    arch = architecture_from_config(config.vae)
    model = build_autoencoder(**arch)
    if arch["latent_channels"] != config.model.in_channels:
        raise ValueError(f"config.vae.latent_channels={arch['latent_channels']} differs from "
                         f"config.model.in_channels={config.model.in_channels}; make them equal.")
    check_diffusers(os.path.abspath(os.path.expanduser(config.vae.weights)), model)
