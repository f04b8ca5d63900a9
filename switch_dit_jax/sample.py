"""Sampling: sharded over every device, CFG, PNG grids and ADM-format `.npz` files.

`python -m switch_dit_jax.main --mode=sample --config=... --workdir=DIR` samples with the EMA
weights of the latest checkpoint in DIR and writes `DIR/samples/samples_<step>.png` and
`DIR/samples/samples_<step>.npz` (`arr_0`: uint8 NHWC images, `arr_1`: int labels; a text
model writes `prompts`, its str prompts, instead, and captions the PNG grid with them).
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


def is_text_model(model: nn.Module) -> bool:
    return getattr(model, "conditioning", "class") == "text"


def _read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sample.prompts={path!r} is not a file; give a text file with "
                                "one prompt per line.")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"sample.prompts={path!r} holds no prompt; write one per line.")
    return prompts


def text_conditions(config, model: nn.Module, encoder=None):
    """(text [P, L, D], text_mask [P, L], prompts [P], null condition) of a text model's
    samples: the caption states of sample.captions_file, or sample.prompts encoded by
    `encoder` (default: the CLIP of text.encoder_dir). The null condition is the empty
    caption of the same encoder."""
    s = config.sample
    if s.get("captions_file"):
        from switch_dit_jax import files
        keys = ("text", "text_mask", "captions", "empty_text", "empty_text_mask")
        a = files.load_npz(s.captions_file, "captions file", keys=keys)
        missing = [k for k in keys if k not in a]
        if missing:
            raise ValueError(f"sample.captions_file={s.captions_file!r} lacks {missing}; write "
                             "it with `python -m switch_dit_jax.data.coco`.")
        text, mask, prompts = a["text"], a["text_mask"], [str(c) for c in a["captions"]]
        null = {"text": a["empty_text"], "text_mask": a["empty_text_mask"]}
    elif s.get("prompts"):
        prompts = _read_prompts(s.prompts)
        if encoder is None:
            from switch_dit_jax.text import load_text_encoder  # lazy: text models only
            if not config.text.encoder_dir:
                raise ValueError("sample.prompts needs the text encoder: set "
                                 "--config.text.encoder_dir to the CLIP directory.")
            encoder = load_text_encoder(config.text.encoder_dir)
        text, mask = encoder.encode(prompts)
        empty, empty_mask = encoder.encode([""])
        null = {"text": empty[0], "text_mask": empty_mask[0]}
    else:
        raise ValueError("a text model samples from prompts: set --config.sample.prompts to a "
                         "text file (one prompt per line) or --config.sample.captions_file to a "
                         "val_captions.npz.")
    want = (model.text_length, model.text_width)
    if tuple(np.shape(text)[1:]) != want:
        raise ValueError(f"the prompts encode to {tuple(np.shape(text)[1:])} text states but "
                         f"the model takes {want} (model.text_length, model.text_width); use "
                         "the text encoder the model was trained with.")
    null = {"text": np.asarray(null["text"], np.float32),
            "text_mask": np.asarray(null["text_mask"], bool)}
    return np.asarray(text, np.float32), np.asarray(mask, bool), np.asarray(prompts), null


def sample_conditions(config, model: nn.Module, n: int, encoder=None):
    """(conditions of n samples, the null condition, what the .npz stores beside the images):
    class labels, or a text model's prompts cycled to n."""
    if not is_text_model(model):
        labels = class_labels(config, model.num_classes, n)
        return labels, model.num_classes, labels
    text, mask, prompts, null = text_conditions(config, model, encoder)
    rows = np.resize(np.arange(len(prompts)), n)
    return {"text": text[rows], "text_mask": mask[rows]}, null, prompts[rows]


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


def make_sample_fn(model: nn.Module, config, on_capacity=None, apply_builder=None,
                   null_condition=None):
    """(params, model_state, labels, key) -> samples [B, H, W, C] in model space.

    `labels` are the conditions: class labels, or a text model's {"text", "text_mask"}, whose
    CFG needs `null_condition` (the empty caption, see sample_conditions).
    `apply_builder(params, model_state)` -> apply_fn(x, t, y) replaces the plain model call
    (multi_expert.py: one of several models, chosen by t)."""
    s = config.sample
    text = is_text_model(model)
    guided = (text or model.num_classes > 1) and s.cfg_scale != 1.0
    if guided and text and null_condition is None:
        raise ValueError("classifier-free guidance of a text model needs the empty caption: "
                         "pass null_condition (sample.sample_conditions returns it).")
    null = null_condition if text else model.num_classes
    if apply_builder is None:
        apply_builder = functools.partial(model_apply_fn, model, on_capacity=on_capacity)
    if config.diffusion.objective == "flow":
        return _flow_sample_fn(model, config, guided, apply_builder, null)
    diffusion = sampling_diffusion(config)

    def sample(params, model_state, labels, key):
        apply_fn = apply_builder(params, model_state)

        if guided:
            model_fn = guided_fn(apply_fn, labels, null, s.cfg_scale,
                                 guided_channels=s.cfg_channels or None, pool=s.cfg_pool)
        else:
            model_fn = lambda x, t: apply_fn(x, t, labels)  # noqa: E731
        shape = (jax.tree.leaves(labels)[0].shape[0], model.input_size, model.input_size,
                 model.in_channels)
        if s.sampler == "ddim":
            return diffusion.ddim_sample_loop(model_fn, shape, key, eta=s.eta,
                                              clip_denoised=s.clip_denoised)
        return diffusion.p_sample_loop(model_fn, shape, key, clip_denoised=s.clip_denoised)

    return sample


def _flow_sample_fn(model: nn.Module, config, guided: bool, apply_builder, null):
    """Rectified flow: integrate the velocity from noise (t=0) to data (t=1)."""
    s = config.sample
    flow = RectifiedFlow()

    def sample(params, model_state, labels, key):
        apply_fn = apply_builder(params, model_state)

        if guided:
            model_fn = guided_fn(apply_fn, labels, null, s.cfg_scale,
                                 guided_channels=s.cfg_channels or None, pool=s.cfg_pool,
                                 out_channels=model.in_channels)
        else:
            model_fn = lambda x, t: apply_fn(x, t, labels)  # noqa: E731
        shape = (jax.tree.leaves(labels)[0].shape[0], model.input_size, model.input_size,
                 model.in_channels)
        return flow.sample(model_fn, shape, key, method=s.sampler, num_steps=s.num_steps,
                           atol=s.atol, rtol=s.rtol)

    return sample


def generate(model: nn.Module, config, params, model_state, mesh, param_shardings,
             num_samples: int | None = None, seed: int | None = None, on_capacity=None,
             apply_builder=None, text_encoder=None):
    """Sample `num_samples` images in batches of config.sample.batch_size over all devices.

    Returns (samples float32 [N, H, W, C] on every host, labels int32 [N]; a text model's
    prompts str [N] instead). `text_encoder` replaces the CLIP of text.encoder_dir.
    """
    n = num_samples or config.sample.num_samples
    # Every device gets the same share: round the batch up to a multiple of the device count
    # (the extra images are sampled and dropped).
    batch = -(-config.sample.batch_size // mesh.size) * mesh.size
    seed = config.sample.seed if seed is None else seed
    conditions, null, labels = sample_conditions(config, model, math.ceil(n / batch) * batch,
                                                 text_encoder)
    data = parallel.batch_sharding(mesh)
    fn = jax.jit(make_sample_fn(model, config, on_capacity, apply_builder, null),
                 in_shardings=(param_shardings, parallel.replicated(mesh), data,
                               parallel.replicated(mesh)),
                 out_shardings=data)
    out = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        for i in range(0, n, batch):
            y = jax.device_put(jax.tree.map(lambda a: a[i:i + batch], conditions), data)
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
    labels = np.asarray(labels)
    if labels.dtype.kind in "US":  # a text model's prompts
        np.savez(tmp, arr_0=images, prompts=labels)
    else:
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
