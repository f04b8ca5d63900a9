"""The InceptionV3 of the TF FID graph (ADM's evaluator) in Flax, NHWC, with local weights.

Outputs per image, as ADM's `evaluations/evaluator.py` reads them from
`classify_image_graph_def.pb` (inception-2015-12-05):

* `pool`    [2048]: `pool_3:0`, the global average of Mixed_7c (FID, precision/recall).
* `spatial` [2023]: `mixed_6/conv:0[..., :7]` flattened. In the TF graph `mixed_6` is the
  7th Inception block (torchvision's Mixed_6d) and `mixed_6/conv` its 1x1 branch (192
  channels, after BN+ReLU); ADM keeps the first 7 channels of the 17x17 map, flattened in
  NHWC order (channels fastest): 17*17*7 = 2023 (sFID). Since that branch comes first in the
  block's concatenation, these are also the first 7 channels of the 17x17x768 Mixed_6d output.
* `logits`  [1008]: `pool_3 @ softmax/weights` *without* the bias, because ADM's IS graph
  multiplies by the MatMul's weight input alone (Inception Score).

Preprocessing follows the TF graph, not pytorch-fid: TF1 `ResizeBilinear` to 299x299 with
align_corners=False and no half-pixel centres (source = dest * in/out; pytorch-fid's
`F.interpolate` samples at half-pixel centres), then `(x - 128) / 128` (pytorch-fid:
`2 * x/255 - 1`). Input pixels are uint8 or floats in [0, 255].

Weight file (no download ever): an `.npz` whose keys and shapes are exactly the PyTorch state
dict of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a port of the TF graph's
constants; `expected_shapes()` is the contract; `num_batches_tracked` entries are ignored).
Convert it once, where torch is installed:

    python -c "import torch, numpy as np; sd = torch.load('pt_inception-2015-12-05-6726825d.pth', map_location='cpu'); np.savez('fid_inception_v3.npz', **{k: v.numpy() for k, v in sd.items()})"

BatchNorm (eps 1e-3) is folded into the convolutions at load time.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from switch_dit_jax.files import load_npz

log = logging.getLogger("switch_dit_jax")

INPUT_SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7
BN_EPS = 1e-3
CONVERT_COMMAND = (
    "python -c \"import torch, numpy as np; sd = torch.load("
    "'pt_inception-2015-12-05-6726825d.pth', map_location='cpu'); np.savez("
    "'fid_inception_v3.npz', **{k: v.numpy() for k, v in sd.items()})\"")


def _c(cin, cout, k, stride=1, pad=0):
    """(cin, cout, (kh, kw), stride, (pad_h, pad_w)) of one conv+BN+ReLU unit."""
    k = (k, k) if isinstance(k, int) else k
    pad = (pad, pad) if isinstance(pad, int) else pad
    return (cin, cout, k, stride, pad)


STEM = {"Conv2d_1a_3x3": _c(3, 32, 3, 2), "Conv2d_2a_3x3": _c(32, 32, 3),
        "Conv2d_2b_3x3": _c(32, 64, 3, pad=1), "Conv2d_3b_1x1": _c(64, 80, 1),
        "Conv2d_4a_3x3": _c(80, 192, 3)}

# (name, kind, in channels, pool features / 7x7 channels). E1/E2 are pytorch-fid's
# FIDInceptionE_1/_2: the graph's last block pools its 4th branch with max, not average.
BLOCKS = (("Mixed_5b", "A", 192, 32), ("Mixed_5c", "A", 256, 64), ("Mixed_5d", "A", 288, 64),
          ("Mixed_6a", "B", 288, 0), ("Mixed_6b", "C", 768, 128), ("Mixed_6c", "C", 768, 160),
          ("Mixed_6d", "C", 768, 160), ("Mixed_6e", "C", 768, 192), ("Mixed_7a", "D", 768, 0),
          ("Mixed_7b", "E1", 1280, 0), ("Mixed_7c", "E2", 2048, 0))
SPATIAL_BLOCK = "Mixed_6d"  # the TF graph's `mixed_6`


def block_convs(kind: str, cin: int, arg: int) -> dict[str, tuple]:
    if kind == "A":
        return {"branch1x1": _c(cin, 64, 1), "branch5x5_1": _c(cin, 48, 1),
                "branch5x5_2": _c(48, 64, 5, pad=2), "branch3x3dbl_1": _c(cin, 64, 1),
                "branch3x3dbl_2": _c(64, 96, 3, pad=1), "branch3x3dbl_3": _c(96, 96, 3, pad=1),
                "branch_pool": _c(cin, arg, 1)}
    if kind == "B":
        return {"branch3x3": _c(cin, 384, 3, 2), "branch3x3dbl_1": _c(cin, 64, 1),
                "branch3x3dbl_2": _c(64, 96, 3, pad=1), "branch3x3dbl_3": _c(96, 96, 3, 2)}
    if kind == "C":
        c7 = arg
        return {"branch1x1": _c(cin, 192, 1), "branch7x7_1": _c(cin, c7, 1),
                "branch7x7_2": _c(c7, c7, (1, 7), pad=(0, 3)),
                "branch7x7_3": _c(c7, 192, (7, 1), pad=(3, 0)),
                "branch7x7dbl_1": _c(cin, c7, 1),
                "branch7x7dbl_2": _c(c7, c7, (7, 1), pad=(3, 0)),
                "branch7x7dbl_3": _c(c7, c7, (1, 7), pad=(0, 3)),
                "branch7x7dbl_4": _c(c7, c7, (7, 1), pad=(3, 0)),
                "branch7x7dbl_5": _c(c7, 192, (1, 7), pad=(0, 3)),
                "branch_pool": _c(cin, 192, 1)}
    if kind == "D":
        return {"branch3x3_1": _c(cin, 192, 1), "branch3x3_2": _c(192, 320, 3, 2),
                "branch7x7x3_1": _c(cin, 192, 1),
                "branch7x7x3_2": _c(192, 192, (1, 7), pad=(0, 3)),
                "branch7x7x3_3": _c(192, 192, (7, 1), pad=(3, 0)),
                "branch7x7x3_4": _c(192, 192, 3, 2)}
    return {"branch1x1": _c(cin, 320, 1), "branch3x3_1": _c(cin, 384, 1),
            "branch3x3_2a": _c(384, 384, (1, 3), pad=(0, 1)),
            "branch3x3_2b": _c(384, 384, (3, 1), pad=(1, 0)),
            "branch3x3dbl_1": _c(cin, 448, 1), "branch3x3dbl_2": _c(448, 384, 3, pad=1),
            "branch3x3dbl_3a": _c(384, 384, (1, 3), pad=(0, 1)),
            "branch3x3dbl_3b": _c(384, 384, (3, 1), pad=(1, 0)),
            "branch_pool": _c(cin, 192, 1)}


def conv_specs() -> dict[str, tuple]:
    """State-dict prefix ('Mixed_5b.branch1x1') -> conv spec, in network order."""
    specs = dict(STEM)
    for name, kind, cin, arg in BLOCKS:
        specs.update({f"{name}.{b}": s for b, s in block_convs(kind, cin, arg).items()})
    return specs


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """The weight-file contract: pytorch-fid state-dict key -> shape."""
    shapes = {}
    for prefix, (cin, cout, (kh, kw), _, _) in conv_specs().items():
        shapes[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{stat}"] = (cout,)
    shapes["fc.weight"] = (NUM_CLASSES, 2048)
    shapes["fc.bias"] = (NUM_CLASSES,)
    return shapes


# ----------------------------------------------------------------------------- network
def _avg_pool(x):
    # TF's average pool does not count the zero padding (pytorch-fid: count_include_pad=False).
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride):
    pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), (stride, stride), padding=pad)


class _Block(nn.Module):
    kind: str
    cin: int
    arg: int
    precision: Any

    @nn.compact
    def __call__(self, x):
        specs = block_convs(self.kind, self.cin, self.arg)

        def c(name, h):
            _, cout, k, stride, (ph, pw) = specs[name]
            h = nn.Conv(cout, k, stride, padding=((ph, ph), (pw, pw)), precision=self.precision,
                        name=name)(h)
            return nn.relu(h)

        def chain(h, *names):
            for name in names:
                h = c(name, h)
            return h

        if self.kind == "A":
            out = [c("branch1x1", x), chain(x, "branch5x5_1", "branch5x5_2"),
                   chain(x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                   c("branch_pool", _avg_pool(x))]
        elif self.kind == "B":
            out = [c("branch3x3", x),
                   chain(x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                   _max_pool(x, 2)]
        elif self.kind == "C":
            out = [c("branch1x1", x), chain(x, *(f"branch7x7_{i}" for i in (1, 2, 3))),
                   chain(x, *(f"branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5))),
                   c("branch_pool", _avg_pool(x))]
        elif self.kind == "D":
            out = [chain(x, "branch3x3_1", "branch3x3_2"),
                   chain(x, *(f"branch7x7x3_{i}" for i in (1, 2, 3, 4))), _max_pool(x, 2)]
        else:
            t = c("branch3x3_1", x)
            d = chain(x, "branch3x3dbl_1", "branch3x3dbl_2")
            pooled = _avg_pool(x) if self.kind == "E1" else _max_pool(x, 1)
            out = [c("branch1x1", x), c("branch3x3_2a", t), c("branch3x3_2b", t),
                   c("branch3x3dbl_3a", d), c("branch3x3dbl_3b", d), c("branch_pool", pooled)]
        return jnp.concatenate(out, axis=-1)


class InceptionV3(nn.Module):
    """FID InceptionV3 on [N, 299, 299, 3] inputs already scaled to the graph's [-1, 1)."""
    precision: Any = jax.lax.Precision.HIGHEST  # FID needs true fp32, not TF32

    @nn.compact
    def __call__(self, x):
        for i, (name, (_, cout, k, stride, (ph, pw))) in enumerate(STEM.items()):
            x = nn.relu(nn.Conv(cout, k, stride, padding=((ph, ph), (pw, pw)),
                                precision=self.precision, name=name)(x))
            if name in ("Conv2d_2b_3x3", "Conv2d_4a_3x3"):
                x = _max_pool(x, 2)
        for name, kind, cin, arg in BLOCKS:
            x = _Block(kind, cin, arg, self.precision, name=name)(x)
            if name == SPATIAL_BLOCK:
                spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        pool = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(NUM_CLASSES, use_bias=False, precision=self.precision, name="fc")(pool)
        return {"pool": pool, "spatial": spatial, "logits": logits}


# ----------------------------------------------------------------------------- weights
def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in the file format, for tests and timing (He-scaled so the
    activations stay finite through the 94 ReLU layers)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in expected_shapes().items():
        if key.endswith("conv.weight") or key == "fc.weight":
            fan_in = int(np.prod(shape[1:]))
            sd[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif key.endswith(("bn.weight", "running_var")):
            sd[key] = np.ones(shape, np.float32)
        else:
            sd[key] = np.zeros(shape, np.float32)
    return sd


def params_from_state_dict(sd, source: str = "the state dict") -> dict:
    """Check every tensor of the contract by name and shape; fold BatchNorm into the convs."""
    shapes = expected_shapes()
    for key in sd:
        if key not in shapes and not key.endswith("num_batches_tracked"):
            raise ValueError(f"{source} holds tensor {key!r}, which the FID InceptionV3 does not "
                             "have; pass the converted pt_inception-2015-12-05 weights.")
    for key, shape in shapes.items():
        if key not in sd:
            raise ValueError(f"{source} lacks tensor {key!r} {list(shape)}; convert "
                             f"pt_inception-2015-12-05-6726825d.pth with: {CONVERT_COMMAND}")
        if tuple(np.shape(sd[key])) != shape:
            raise ValueError(f"tensor {key!r} in {source} has shape {list(np.shape(sd[key]))} "
                             f"but the FID InceptionV3 needs {list(shape)}; pass the converted "
                             "pt_inception-2015-12-05 weights.")
    params: dict = {}
    for prefix in conv_specs():
        g = lambda s: np.asarray(sd[f"{prefix}.bn.{s}"], np.float64)  # noqa: E731
        scale = g("weight") / np.sqrt(g("running_var") + BN_EPS)
        w = np.asarray(sd[f"{prefix}.conv.weight"], np.float64).transpose(2, 3, 1, 0)  # OIHW->HWIO
        node = params
        for part in prefix.split("."):
            node = node.setdefault(part, {})
        node["kernel"] = (w * scale).astype(np.float32)
        node["bias"] = (g("bias") - g("running_mean") * scale).astype(np.float32)
    # fc.bias is checked but unused: ADM's IS softmax multiplies by the weight alone.
    params["fc"] = {"kernel": np.asarray(sd["fc.weight"], np.float32).T}
    return params


@functools.lru_cache(maxsize=2)
def load_params(path: str) -> dict:
    """Folded Flax params from a weight file (see the module docstring for the format)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weight file {path!r} does not exist; convert "
                                f"pt_inception-2015-12-05-6726825d.pth once with: "
                                f"{CONVERT_COMMAND}")
    if not path.endswith(".npz"):
        raise ValueError(f"Inception weight file {path!r} is not an .npz; convert the .pth "
                         f"once (torch is not used at run time) with: {CONVERT_COMMAND}")
    sd = load_npz(path, "Inception weight file")
    return params_from_state_dict(sd, f"Inception weight file {path!r}")


# ----------------------------------------------------------------------------- features
def tf1_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] bilinear weights of TF1 ResizeBilinear(align_corners=False): the source
    coordinate is dest * in/out (no half-pixel offset), computed in float32 like TF."""
    src = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo).astype(np.float64)
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m.astype(np.float32)


def preprocess(images) -> jax.Array:
    """uint8 / [0, 255] NHWC RGB -> the graph's 299x299 input in [-1, 1)."""
    x = jnp.asarray(images).astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)  # grayscale data: the graph expects RGB
    h, w = x.shape[1:3]
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        hi = jax.lax.Precision.HIGHEST
        x = jnp.einsum("oh,nhwc->nowc", tf1_resize_matrix(h, INPUT_SIZE), x, precision=hi)
        x = jnp.einsum("pw,nowc->nopc", tf1_resize_matrix(w, INPUT_SIZE), x, precision=hi)
    return (x - 128.0) / 128.0


@functools.lru_cache(maxsize=8)
def _compiled(precision, mesh):
    """Jitted preprocessing and network for one mesh, shared by every FIDInception."""
    batch = NamedSharding(mesh, P(mesh.axis_names))
    rep = NamedSharding(mesh, P())
    prep = jax.jit(preprocess, in_shardings=batch, out_shardings=batch)
    net = jax.jit(InceptionV3(precision).apply, in_shardings=(rep, batch), out_shardings=rep)
    return batch, rep, prep, net


class FIDInception:
    """The network with its weights, and batched feature extraction sharded over a mesh."""

    def __init__(self, params: dict, precision: Any = jax.lax.Precision.HIGHEST):
        self.params = params
        self.precision = precision
        self._device_params: dict = {}

    @classmethod
    def load(cls, path: str) -> "FIDInception":
        return cls(load_params(path))

    def features(self, images: np.ndarray, batch_size: int = 200, mesh=None,
                 progress: bool = True) -> dict[str, np.ndarray]:
        """{'pool': [N, 2048], 'spatial': [N, 2023], 'logits': [N, 1008]} float32 arrays.

        `images`: [N, H, W, 3 or 1] uint8 (or floats in [0, 255]), an array or anything with
        `.shape` and slicing. Every process passes the same images; each batch is split over
        all devices of `mesh` (default: every device) and the last one is zero-padded.
        """
        if not hasattr(images, "shape"):
            images = np.asarray(images)
        shape = tuple(images.shape)  # `images` may be a lazy metrics.NpzImages
        if len(shape) != 4 or shape[-1] not in (1, 3) or shape[0] == 0:
            raise ValueError(f"Inception input must be non-empty NHWC images with 1 or 3 "
                             f"channels, got shape {shape}.")
        if mesh is None:
            mesh = default_mesh()
        batch_sharding, rep, prep, net = _compiled(self.precision, mesh)
        if mesh not in self._device_params:
            self._device_params[mesh] = jax.device_put({"params": self.params}, rep)
        params = self._device_params[mesh]
        ndev = mesh.devices.size
        step = -(-max(int(batch_size), 1) // ndev) * ndev
        n = shape[0]
        outs: dict[str, list] = {"pool": [], "spatial": [], "logits": []}
        start = last_log = time.time()
        pending = None
        for i in range(0, n + step, step):
            if i < n:  # dispatch batch i before fetching the previous one: reads overlap compute
                chunk = np.asarray(images[i:i + step])
                if len(chunk) < step:
                    pad = np.zeros((step - len(chunk),) + chunk.shape[1:], chunk.dtype)
                    chunk = np.concatenate([chunk, pad])
                x = jax.make_array_from_callback(chunk.shape, batch_sharding,
                                                 lambda idx: chunk[idx])
                current = (net(params, prep(x)), min(step, n - i))
            if pending is not None:
                result, count = pending
                for k, v in result.items():
                    outs[k].append(np.asarray(v)[:count])
                done = min(i, n)
                if progress and (time.time() - last_log > 10 or done == n):
                    last_log = time.time()
                    log.info("inception features: %d/%d images (%.1f images/s)", done, n,
                             done / max(last_log - start, 1e-9))
            pending = current if i < n else None
        return {k: np.concatenate(v) for k, v in outs.items()}


def default_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(AxisType.Auto,))
