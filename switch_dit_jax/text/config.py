"""The architecture of a Hugging Face CLIP directory, read from its `config.json`.

Two layouts are read: a full `CLIPModel` config (`text_config` / `vision_config`, with the
older `text_config_dict` / `vision_config_dict` overriding them as in transformers) and a
`CLIPTextModel` config (the text fields at the top level, as in Stable Diffusion's
`text_encoder/`). A field the file omits takes the value of OpenAI's ViT-L/14, the CLIP that
DTR and DiffMoE condition on.
"""
from __future__ import annotations

import dataclasses
import json
import os

from switch_dit_jax.errors import BadFileError

ACTIVATIONS = ("quick_gelu", "gelu")
FETCH_HINT = ("fetch the model once on a machine with internet, e.g. `huggingface-cli download "
              "openai/clip-vit-large-patch14 config.json model.safetensors tokenizer.json "
              "tokenizer_config.json special_tokens_map.json --local-dir DIR`, and pass DIR")


@dataclasses.dataclass(frozen=True)
class Tower:
    """One pre-LN transformer stack (the text or the vision tower)."""
    width: int
    layers: int
    heads: int
    mlp_width: int
    act: str = "quick_gelu"
    eps: float = 1e-5


def _named(key: str, default: int):
    """A field that config.json spells `key` (the others keep their own name there)."""
    return dataclasses.field(default=default, metadata={"key": key})


# A tower config's fields after `tower` are read from config.json by `_tower_config`.
@dataclasses.dataclass(frozen=True)
class TextConfig:
    tower: Tower
    vocab_size: int = 49408
    max_length: int = _named("max_position_embeddings", 77)
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    tower: Tower
    image_size: int = 224
    patch_size: int = 14
    channels: int = _named("num_channels", 3)


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    text: TextConfig
    vision: VisionConfig | None  # None for a CLIPTextModel directory
    projection_dim: int | None   # None for a CLIPTextModel directory


def model_file(model_dir: str, name: str) -> str:
    """`model_dir/name`, or FileNotFoundError naming the path and how to fetch it."""
    path = os.path.join(os.fspath(model_dir), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP file {path!r} does not exist; {FETCH_HINT}.")
    return path


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadFileError(f"{path!r} is not valid JSON ({e}); download it again.") from None
    if not isinstance(value, dict):
        raise BadFileError(f"{path!r} holds a {type(value).__name__}, not a JSON object; "
                           "download it again.")
    return value


def _int(fields: dict, name: str, default: int, path: str) -> int:
    value = fields.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadFileError(f"{path!r} gives {name}={value!r}, which must be a positive integer; "
                           "the file is not a CLIP config.")
    return value


def _tower(fields: dict, path: str, width: int, layers: int, heads: int) -> Tower:
    width = _int(fields, "hidden_size", width, path)
    heads = _int(fields, "num_attention_heads", heads, path)
    if width % heads:
        raise BadFileError(f"{path!r} gives hidden_size={width}, which num_attention_heads="
                           f"{heads} does not divide; the file is not a CLIP config.")
    act = fields.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise BadFileError(f"{path!r} gives hidden_act={act!r}; this CLIP supports "
                           f"{' and '.join(ACTIVATIONS)} only.")
    eps = fields.get("layer_norm_eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise BadFileError(f"{path!r} gives layer_norm_eps={eps!r}, which must be a positive "
                           "number.")
    return Tower(width, _int(fields, "num_hidden_layers", layers, path), heads,
                 _int(fields, "intermediate_size", 4 * width, path), act, float(eps))


def _tower_config(cls, fields: dict, path: str, *, width: int, layers: int, heads: int,
                  **given):
    """`cls` (TextConfig or VisionConfig) of one section of config.json: its tower, then each
    field that `given` does not set, a positive integer (the dataclass default where the file
    omits it)."""
    sizes = {f.name: _int(fields, f.metadata.get("key", f.name), f.default, path)
             for f in dataclasses.fields(cls)[1:] if f.name not in given}
    return cls(_tower(fields, path, width, layers, heads), **sizes, **given)


def _section(config: dict, name: str) -> dict:
    fields = dict(config.get(name) or {})
    fields.update(config.get(name + "_dict") or {})  # transformers lets *_dict win
    return fields


def read_config(model_dir: str) -> ClipConfig:
    """The CLIP (or CLIP text model) architecture of `model_dir/config.json`."""
    path = model_file(model_dir, "config.json")
    config = read_json(path)
    full = "text_config" in config or "text_config_dict" in config
    text_fields = _section(config, "text_config") if full else config
    # eos_token_id is an id, not a size (and 2 in OpenAI's own files: see clip.eos_positions)
    eos = int(text_fields.get("eos_token_id", TextConfig.eos_token_id))
    text = _tower_config(TextConfig, text_fields, path, width=768, layers=12, heads=12,
                         eos_token_id=eos)
    vision = None
    if full:
        vision = _tower_config(VisionConfig, _section(config, "vision_config"), path,
                               width=1024, layers=24, heads=16)
        if vision.image_size % vision.patch_size:
            raise BadFileError(f"{path!r} gives image_size={vision.image_size}, which "
                               f"patch_size={vision.patch_size} does not divide; the file is "
                               "not a CLIP config.")
    projection = _int(config, "projection_dim", 768, path) if full else None
    return ClipConfig(text, vision, projection)
