"""diffusers `diffusion_pytorch_model.safetensors` <-> Flax parameters of `AutoencoderKL`.

Names map one to one: the Flax path ("encoder", "down_blocks_0", "resnets_0", "norm1", "scale")
is the diffusers name "encoder.down_blocks.0.resnets.0.norm1.weight". Values: conv kernels
OIHW <-> HWIO, linear weights [out, in] <-> [in, out], GroupNorm weight <-> scale. Only NumPy
and safetensors are needed; nothing of PyTorch.

diffusers before 0.14 saved the mid-block attention as `query/key/value/proj_attn`, newer
versions as `to_q/to_k/to_v/to_out.0`; both load. Files converted straight from ldm sometimes
keep those projections as 1x1 convs ([C, C, 1, 1]); those load too.
"""
from __future__ import annotations

import hashlib
import os
import re

import jax
import numpy as np
from flax import traverse_util

from switch_dit_jax.errors import BadFileError
from switch_dit_jax.files import SafetensorsFile
from switch_dit_jax.vae.autoencoder import AutoencoderKL, abstract_params

LEGACY_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value",
                          "to_out.0": "proj_attn"}


class VAEWeightsError(BadFileError):
    """A weights file that does not fit the configured VAE; the message names the tensor."""


def diffusers_name(path: tuple[str, ...]) -> str:
    """Flax parameter path -> diffusers tensor name."""
    *modules, leaf = path
    parts = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join(parts + ["bias" if leaf == "bias" else "weight"])


def legacy_name(name: str) -> str:
    """The pre-0.14 diffusers name of a tensor (the same name for all but the attention)."""
    for new, old in LEGACY_ATTENTION_NAMES.items():
        marker = f".attentions.0.{new}."
        if marker in name:
            return name.replace(marker, f".attentions.0.{old}.")
    return name


def to_torch_layout(path: tuple[str, ...], value) -> np.ndarray:
    value = np.asarray(value)
    if path[-1] == "kernel":
        return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    return value


def _to_flax_layout(path: tuple[str, ...], value: np.ndarray, flax_shape) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    if len(flax_shape) == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]  # ldm-style 1x1-conv attention projection
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def expected_tensors(model: AutoencoderKL) -> dict[str, tuple[int, ...]]:
    """diffusers name -> PyTorch-layout shape of every tensor the model needs."""
    flat = traverse_util.flatten_dict(abstract_params(model))
    return {diffusers_name(p): tuple(to_torch_layout(p, np.empty(s.shape, np.int8)).shape)
            for p, s in flat.items()}


def save_diffusers(params, path: str, legacy_attention_names: bool = False) -> str:
    """Writes Flax VAE parameters as a diffusers-layout safetensors file (float32)."""
    from safetensors.numpy import save_file
    tensors = {}
    for p, value in traverse_util.flatten_dict(jax.device_get(params)).items():
        name = diffusers_name(p)
        name = legacy_name(name) if legacy_attention_names else name
        tensors[name] = np.ascontiguousarray(to_torch_layout(p, value), dtype=np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path)
    return path


def _describe(model: AutoencoderKL) -> str:
    return (f"vae.block_out_channels={tuple(model.block_out_channels)}, "
            f"vae.layers_per_block={model.layers_per_block}, "
            f"vae.latent_channels={model.latent_channels}")


def _open(path: str) -> SafetensorsFile:
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"VAE weights file {path!r} does not exist; pass the local path of "
                                "the VAE's diffusion_pytorch_model.safetensors (e.g. from "
                                "stabilityai/sd-vae-ft-ema).")
    return SafetensorsFile(path, "VAE weights file", error=VAEWeightsError)


def _match(path: str, f, model: AutoencoderKL) -> dict:
    """Flax path -> file key, after checking names and shapes from the header alone."""
    keys = set(f.keys())
    matched = {}
    for p, abstract in traverse_util.flatten_dict(abstract_params(model)).items():
        name = diffusers_name(p)
        key = name if name in keys else legacy_name(name)
        if key not in keys:
            raise VAEWeightsError(
                f"VAE weights file {path!r} has no tensor {name!r}; it is not a diffusers "
                f"AutoencoderKL with {_describe(model)} (check the file and the vae.* "
                "architecture settings).")
        f.check_float(key)
        shape = f.shape(key)
        want = tuple(to_torch_layout(p, np.empty(abstract.shape, np.int8)).shape)
        if not (shape == want or (len(want) == 2 and shape == want + (1, 1))):
            raise VAEWeightsError(
                f"tensor {key!r} in {path!r} has shape {shape} but the VAE with "
                f"{_describe(model)} needs {want}; set the vae.* architecture to the file's.")
        matched[p] = (key, abstract.shape)
    extra = sorted(keys - {key for key, _ in matched.values()})
    if extra:
        raise VAEWeightsError(
            f"VAE weights file {path!r} has {len(extra)} tensor(s) the VAE with {_describe(model)} "
            f"does not use, first {extra[0]!r}; pass an AutoencoderKL file with this architecture.")
    return matched


def check_diffusers(path: str, model: AutoencoderKL) -> None:
    """Raises unless `path` holds exactly the tensors of `model` (reads only the header)."""
    _match(path, _open(path), model)


def load_diffusers(path: str, model: AutoencoderKL):
    """Reads a diffusers AutoencoderKL safetensors file into Flax parameters (float32 NumPy).

    Every tensor the model needs must be present with its shape, and no other tensor may be
    in the file: either would mean the file is not this VAE. Half-precision tensors are cast;
    integer tensors and NaN or inf values are refused by name.
    """
    f = _open(path)
    out = {p: _to_flax_layout(p, f.get(key), shape)
           for p, (key, shape) in _match(path, f, model).items()}
    return traverse_util.unflatten_dict(out)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
