"""Hugging Face CLIP `model.safetensors` -> the Flax parameters of `clip.py`, key by key.

The key tables feed `models.convert_engine.assemble` (every key used exactly once, every
variable filled). Before any tensor is read, the file's header is checked against the table
so that a missing, unknown or mis-shaped tensor is refused in one sentence naming the key and
the file. Older exports also store `*.embeddings.position_ids` (integer 0..n-1); they are
checked, not imported. `logit_scale` is the one tensor no part of this package uses (the CLIP
score has a fixed scale of 100); the text encoder also leaves the vision tower and the
projections alone.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from switch_dit_jax.errors import BadFileError
from switch_dit_jax.files import SafetensorsFile
from switch_dit_jax.models.convert_engine import Buffer, Param, Table, assemble
from switch_dit_jax.text.clip import ClipModel, TextTransformer
from switch_dit_jax.text.config import ClipConfig, Tower, model_file


class Permute:
    """A torch -> Flax axis permutation that can also say the torch shape of a Flax shape."""

    def __init__(self, *axes: int):
        self.axes = axes

    def __call__(self, value: np.ndarray) -> np.ndarray:
        return np.transpose(value, self.axes)

    def torch_shape(self, flax_shape) -> tuple[int, ...]:
        return tuple(int(flax_shape[i]) for i in np.argsort(self.axes))


_LINEAR = Permute(1, 0)    # torch Linear [out, in] -> Flax kernel [in, out]
_CONV = Permute(2, 3, 1, 0)  # torch Conv2d [out, in, kh, kw] -> Flax [kh, kw, in, out]


def torch_shapes(table: Table, params) -> dict[str, tuple[int, ...]]:
    """The shape each key of `table` must have in the file, given the Flax `params` shapes."""
    shapes = {}
    for key, rule in table.items():
        if isinstance(rule, Buffer):
            shapes[key] = tuple(np.shape(rule.value))
            continue
        leaf = params
        for part in rule.path:
            leaf = leaf[part]
        shapes[key] = (rule.transform.torch_shape(leaf.shape)
                       if isinstance(rule.transform, Permute) else tuple(leaf.shape))
    return shapes


def _dense(key: str, path: tuple[str, ...], bias: bool = True) -> Table:
    table: Table = {f"{key}.weight": Param(path + ("kernel",), _LINEAR)}
    if bias:
        table[f"{key}.bias"] = Param(path + ("bias",))
    return table


def _norm(key: str, path: tuple[str, ...]) -> Table:
    return {f"{key}.weight": Param(path + ("scale",)),
            f"{key}.bias": Param(path + ("bias",))}


def _encoder(key: str, path: tuple[str, ...], tower: Tower) -> Table:
    table: Table = {}
    for i in range(tower.layers):
        k, p = f"{key}.layers.{i}", path + (f"layers_{i}",)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            table |= _dense(f"{k}.self_attn.{name}", p + (name,))
        table |= _dense(f"{k}.mlp.fc1", p + ("fc1",)) | _dense(f"{k}.mlp.fc2", p + ("fc2",))
        table |= _norm(f"{k}.layer_norm1", p + ("layer_norm1",))
        table |= _norm(f"{k}.layer_norm2", p + ("layer_norm2",))
    return table


def text_table(config: ClipConfig, path: tuple[str, ...]) -> Table:
    """The `text_model.*` keys -> Flax paths under `path` (a TextTransformer's params)."""
    e = "text_model.embeddings"
    return ({f"{e}.token_embedding.weight": Param(path + ("token_embedding", "embedding")),
             f"{e}.position_embedding.weight": Param(path + ("position_embedding",))}
            | _encoder("text_model.encoder", path + ("encoder",), config.text.tower)
            | _norm("text_model.final_layer_norm", path + ("final_layer_norm",)))


def vision_table(config: ClipConfig) -> Table:
    """The `vision_model.*` keys and both projections -> Flax paths of a ClipModel."""
    e, p = "vision_model.embeddings", ("vision_model",)
    return ({f"{e}.class_embedding": Param(p + ("class_embedding",)),
             f"{e}.patch_embedding.weight": Param(p + ("patch_embedding", "kernel"), _CONV),
             f"{e}.position_embedding.weight": Param(p + ("position_embedding",))}
            | _norm("vision_model.pre_layrnorm", p + ("pre_layrnorm",))
            | _encoder("vision_model.encoder", p + ("encoder",), config.vision.tower)
            | _norm("vision_model.post_layernorm", p + ("post_layernorm",))
            | _dense("text_projection", ("text_projection",), bias=False)
            | _dense("visual_projection", ("visual_projection",), bias=False))


def _position_ids(count: int, path: str) -> Buffer:
    return Buffer(np.arange(count)[None], what="position ids 0..n-1",
                  hint=f"{path!r} is not a Hugging Face CLIP export, so download it again")


class _LazyTensors(Mapping):
    """The file's tensors by key, each read only when assemble asks for it."""

    def __init__(self, f: SafetensorsFile, keys):
        self.f, self._keys = f, sorted(keys)

    def __getitem__(self, key):
        if key.endswith("position_ids"):  # integer: SafetensorsFile reads weights only
            from safetensors import safe_open
            with safe_open(self.f.path, framework="np") as g:
                return g.get_tensor(key)
        return self.f.get(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


def abstract_params(module, *inputs):
    """{"params": shapes} of `module`, without computing."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))
    return {"params": shapes["params"]}


def _check_header(f: SafetensorsFile, table: Table, expected, keys: set, what: str) -> None:
    missing = sorted(set(table) - keys)
    if missing:
        raise BadFileError(f"CLIP weights file {f.path!r} has no tensor {missing[0]!r} "
                           f"({len(missing)} missing in all), which {what} needs; download the "
                           "model.safetensors that belongs to this config.json.")
    unknown = sorted(keys - set(table))
    if unknown:
        raise BadFileError(f"CLIP weights file {f.path!r} has tensor {unknown[0]!r} "
                           f"({len(unknown)} unknown in all), which {what} does not have; the "
                           "file is not a Hugging Face CLIP of this config.json.")
    for key, want in torch_shapes(table, expected["params"]).items():
        if f.shape(key) != want:
            raise BadFileError(f"tensor {key!r} in {f.path!r} has shape {f.shape(key)} but "
                               f"{what} needs {want}; download the model.safetensors that "
                               "belongs to this config.json.")


def _load(model_dir: str, table: Table, expected, is_used, what: str):
    path = model_file(model_dir, "model.safetensors")
    f = SafetensorsFile(path, "CLIP weights file")
    keys = {k for k in f.keys() if is_used(k)}
    for key in keys:
        if key.endswith(".embeddings.position_ids"):
            table[key] = _position_ids(int(f.shape(key)[-1]) if f.shape(key) else 0, path)
    _check_header(f, table, expected, keys, what)
    params = assemble(_LazyTensors(f, keys), table, expected, f"{path!r} of {what}")
    return params["params"]


def _describe(tower: Tower, name: str) -> str:
    return f"a CLIP {name} tower of {tower.layers} layers of width {tower.width}"


def load_text_params(model_dir: str, config: ClipConfig):
    """The TextTransformer params of `model_dir/model.safetensors` (its text_model.* keys)."""
    c = config.text
    expected = abstract_params(TextTransformer(c), jnp.zeros((1, c.max_length), jnp.int32))
    table = text_table(config, ())
    # the text encoder reads no other part of a full CLIP; unknown top-level keys still fail
    other = ("vision_model.", "text_projection.", "visual_projection.", "logit_scale")
    return _load(model_dir, table, expected, lambda k: not k.startswith(other),
                 _describe(c.tower, "text"))


def load_clip_params(model_dir: str, config: ClipConfig):
    """The ClipModel params (both towers and projections) of `model_dir/model.safetensors`."""
    c = config
    s = c.vision.image_size
    expected = abstract_params(ClipModel(c), jnp.zeros((1, c.text.max_length), jnp.int32),
                               jnp.zeros((1, s, s, c.vision.channels)))
    table = text_table(c, ("text_model",)) | vision_table(c)
    what = (f"{_describe(c.text.tower, 'text')} and {_describe(c.vision.tower, 'vision')} "
            f"with projections to {c.projection_dim}")
    return _load(model_dir, table, expected, lambda k: k != "logit_scale", what)
