"""Sampling: sharded over every device, CFG, PNG grids and ADM-format `.npz` files.

`python -m switch_dit_jax.main --mode=sample --config=... --workdir=DIR` samples with the EMA
weights of the latest checkpoint in DIR and writes `DIR/samples/samples_<step>.png` and
`DIR/samples/samples_<step>.npz` (`arr_0`: uint8 NHWC images, `arr_1`: int labels).
Latent models (data.name="latents") have their samples decoded to pixels by the VAE of
`config.vae`; without `config.vae.weights` only `DIR/samples/latents_<step>.npz` is written.
"""
from __future__ import annotations

import functools
import logging
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from switch_dit_jax import parallel
from switch_dit_jax.diffusion.flow import RectifiedFlow
from switch_dit_jax.diffusion.gaussian import GaussianDiffusion
from switch_dit_jax.diffusion.guidance import guided_fn
from switch_dit_jax.train.state import model_params
from switch_dit_jax.validation import parse_labels

log = logging.getLogger("switch_dit_jax")


def sampling_diffusion(config) -> GaussianDiffusion:
    return GaussianDiffusion(schedule=config.diffusion.schedule,
                             num_timesteps=config.diffusion.num_timesteps,
                             learn_sigma=config.model.learn_sigma,
                             timestep_respacing=str(config.sample.num_steps))


def class_labels(config, num_classes: int, n: int) -> np.ndarray:
    """config.sample.labels repeated to n, or 0, 1, 2, ... cycling through the classes."""
    labels = parse_labels(config.sample.labels, num_classes) or list(range(num_classes))
    return np.resize(np.asarray(labels, np.int32), n)


def model_apply_fn(model: nn.Module, params, model_state, on_capacity=None):
    """apply_fn(x, t, y) of the sampler. With `on_capacity`, every model evaluation also sends
    (t, capacities [L, E], per-sample capacities [L, B] of its mixture layers) to the host
    callback (DiffMoE reporting)."""
    variables = {"params": model_params(params), **model_state}
    if on_capacity is None:
        return lambda x, t, y: model.apply(variables, x, t, y)

    def apply_fn(x, t, y):
        out, aux = model.apply(variables, x, t, y, mutable=["aux"])
        blocks = aux.get("aux", {})
        mlps = [blocks.get(f"blocks_{i}", {}).get("mlp", {}) for i in range(model.depth)]
        caps = [m["capacity"][0] for m in mlps if "capacity" in m]
        if caps:  # per-sample shares: DiffMoE's dynamic layers only ([0, B] otherwise)
            shares = [m["sample_capacity"][0] for m in mlps if "sample_capacity" in m]
            shares = jnp.stack(shares) if shares else jnp.zeros((0, x.shape[0]))
            jax.debug.callback(on_capacity, t[0], jnp.stack(caps), shares)
        return out

    return apply_fn


def make_sample_fn(model: nn.Module, config, on_capacity=None, apply_builder=None):
    """(params, model_state, labels, key) -> samples [B, H, W, C] in model space.

    `apply_builder(params, model_state)` -> apply_fn(x, t, y) replaces the plain model call
    (multi_expert.py: one of several models, chosen by t)."""
    s = config.sample
    guided = model.num_classes > 1 and s.cfg_scale != 1.0
    if apply_builder is None:
        apply_builder = functools.partial(model_apply_fn, model, on_capacity=on_capacity)
    if config.diffusion.objective == "flow":
        return _flow_sample_fn(model, config, guided, apply_builder)
    diffusion = sampling_diffusion(config)

    def sample(params, model_state, labels, key):
        apply_fn = apply_builder(params, model_state)

        if guided:
            model_fn = guided_fn(apply_fn, labels, model.num_classes, s.cfg_scale,
                                 guided_channels=s.cfg_channels or None, pool=s.cfg_pool)
        else:
            model_fn = lambda x, t: apply_fn(x, t, labels)  # noqa: E731
        shape = (labels.shape[0], model.input_size, model.input_size, model.in_channels)
        if s.sampler == "ddim":
            return diffusion.ddim_sample_loop(model_fn, shape, key, eta=s.eta,
                                              clip_denoised=s.clip_denoised)
        return diffusion.p_sample_loop(model_fn, shape, key, clip_denoised=s.clip_denoised)

    return sample


def _flow_sample_fn(model: nn.Module, config, guided: bool, apply_builder):
    """Rectified flow: integrate the velocity from noise (t=0) to data (t=1)."""
    s = config.sample
    flow = RectifiedFlow()

    def sample(params, model_state, labels, key):
        apply_fn = apply_builder(params, model_state)

        if guided:
            model_fn = guided_fn(apply_fn, labels, model.num_classes, s.cfg_scale,
                                 guided_channels=s.cfg_channels or None, pool=s.cfg_pool,
                                 out_channels=model.in_channels)
        else:
            model_fn = lambda x, t: apply_fn(x, t, labels)  # noqa: E731
        shape = (labels.shape[0], model.input_size, model.input_size, model.in_channels)
        return flow.sample(model_fn, shape, key, method=s.sampler, num_steps=s.num_steps,
                           atol=s.atol, rtol=s.rtol)

    return sample


def generate(model: nn.Module, config, params, model_state, mesh, param_shardings,
             num_samples: int | None = None, seed: int | None = None, on_capacity=None,
             apply_builder=None):
    """Sample `num_samples` images in batches of config.sample.batch_size over all devices.

    Returns (samples float32 [N, H, W, C] on every host, labels int32 [N]).
    """
    n = num_samples or config.sample.num_samples
    # Every device gets the same share: round the batch up to a multiple of the device count
    # (the extra images are sampled and dropped).
    batch = -(-config.sample.batch_size // mesh.size) * mesh.size
    seed = config.sample.seed if seed is None else seed
    labels = class_labels(config, model.num_classes, math.ceil(n / batch) * batch)
    data = parallel.batch_sharding(mesh)
    fn = jax.jit(make_sample_fn(model, config, on_capacity, apply_builder),
                 in_shardings=(param_shardings, parallel.replicated(mesh), data,
                               parallel.replicated(mesh)),
                 out_shardings=data)
    out = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        for i in range(0, n, batch):
            y = jax.device_put(labels[i:i + batch], data)
            x = fn(params, model_state, y, jax.random.fold_in(jax.random.PRNGKey(seed), i))
            out.append(np.asarray(multihost_utils.process_allgather(x, tiled=True)))
            log.info("sampled %d/%d images", min(i + batch, n), n)
    return np.concatenate(out)[:n], labels[:n]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8, as ADM's sample script does."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int | None = None, upscale: int = 1) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows·H, cols·W, C] grid with a 1-pixel gap."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * (h + 1) + 1, ncols * (w + 1) + 1, c), np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, ncols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = img
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    return grid


def save_png(path: str, grid: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def save_npz(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """ADM format; written under a temporary name and renamed, so it is never half-written."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, arr_0=images, arr_1=labels)
    os.replace(tmp, path)


@functools.lru_cache(maxsize=4)
def _vae_decoder(model, mesh):
    """One compiled decoder per (VAE, mesh), reused by every in-training sample grid."""
    data = parallel.batch_sharding(mesh)
    return jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"),
                   in_shardings=(parallel.replicated(mesh), data), out_shardings=data)


def decode_latents(config, latents: np.ndarray, mesh) -> np.ndarray | None:
    """Model-space latents [N, h, w, c] -> images [N, 8h, 8w, 3] in about [-1, 1], decoded by
    the VAE of `config.vae` over every device of `mesh`; None when `config.vae.weights` is empty.
    """
    vae_config = config.get("vae")
    if vae_config is None or not vae_config.get("weights"):
        log.warning("config.vae.weights is empty, so samples stay latents (no PNG); set "
                    "--config.vae.weights=/path/diffusion_pytorch_model.safetensors to decode "
                    "them.")
        return None
    from switch_dit_jax import vae as vae_lib  # lazy: only latent runs need the VAE
    model, params = vae_lib.load_vae_from_config(vae_config)
    if latents.shape[-1] != model.latent_channels:
        raise ValueError(f"samples have {latents.shape[-1]} channels but vae.latent_channels="
                         f"{model.latent_channels}; make model.in_channels and the VAE agree.")
    data, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    fn = _vae_decoder(model, mesh)
    params = jax.device_put(params, rep)
    batch = math.ceil(max(1, vae_config.get("batch_size", 32)) / mesh.size) * mesh.size
    z = np.asarray(latents, np.float32) / np.float32(config.data.latent_scale)
    out = []
    with jax.set_mesh(mesh):
        for i in range(0, len(z), batch):
            chunk = z[i:i + batch]
            padded = np.zeros((batch,) + z.shape[1:], np.float32)
            padded[:len(chunk)] = chunk
            x = fn(params, jax.device_put(padded, data))
            out.append(np.asarray(multihost_utils.process_allgather(x, tiled=True))[:len(chunk)])
    log.info("decoded %d latents to %s images with the VAE %s", len(z), out[0].shape[1:],
             vae_config.weights)
    return np.concatenate(out)


def save_latents(path: str, latents: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    """Latent samples as they are (no VAE configured): `arr_0` float32 model-space latents."""
    if jax.process_index() == 0:
        save_npz(path, np.asarray(latents, np.float32), labels)
    log.info("wrote latent samples (not images) to %s", path)
    return {"npz": path}


def grid_upscale(image_size: int) -> int:
    """Small images (digits) are enlarged in PNGs so that people can see them."""
    return max(1, 64 // image_size)
