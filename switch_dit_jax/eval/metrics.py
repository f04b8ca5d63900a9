"""FID, sFID, Inception Score and improved precision/recall as ADM's evaluator computes them
(guided-diffusion `evaluations/evaluator.py`), and ADM-format reference `.npz` files.

Reference files: ADM's hold `arr_0` (uint8 NHWC images) and `mu`, `sigma` (pool_3 statistics),
`mu_s`, `sigma_s` (mixed_6/conv statistics). Ours add `pool` ([N, 2048] float32 activations,
which precision/recall needs) and may hold `spatial` ([N, 2023]). Stored statistics win over
ones computed from activations or images, as in ADM.
"""
from __future__ import annotations

import functools
import logging
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg
from scipy.special import logsumexp

from switch_dit_jax import files

log = logging.getLogger("switch_dit_jax")

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
METRIC_KEYS = ("fid", "sfid", "inception_score", "precision", "recall")


# ----------------------------------------------------------------------------- FID
def compute_statistics(activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    acts = np.asarray(activations, np.float64)
    if acts.ndim != 2 or len(acts) < 2:
        raise ValueError(f"statistics need at least 2 feature vectors [N, D], got shape "
                         f"{acts.shape}; evaluate more images.")
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), with ADM's and
    pytorch-fid's guards for a nearly singular product."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different feature sizes: mu {mu1.shape} vs "
                         f"{mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}; compute both "
                         "with the same network and layer.")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # finiteness is checked below
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            log.warning("Frechet distance: singular product; adding %g to the diagonal of "
                        "both covariances", eps)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are not "
                             "valid (check for NaNs or too few samples).")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- IS
def inception_score(logits: np.ndarray, num_splits: int = 10) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over `num_splits` contiguous splits.

    ADM splits into chunks of 5000 images, which is 10 splits for its 50K samples; fewer
    images than splits use one image per split.
    """
    logits = np.asarray(logits, np.float64)
    logp = logits - logsumexp(logits, axis=1, keepdims=True)
    scores = []
    for part in np.array_split(logp, min(num_splits, len(logp))):
        p = np.exp(part)
        log_marginal = np.log(np.mean(p, axis=0, keepdims=True))
        scores.append(np.exp(np.mean(np.sum(p * (part - log_marginal), axis=1))))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- precision/recall
def _sq_distances(u, v, half: bool):
    def dist(a, b):
        na = jnp.sum(jnp.square(a), axis=1, keepdims=True)
        nb = jnp.sum(jnp.square(b), axis=1)[None, :]
        ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
        return jnp.maximum(na - 2 * ab + nb, 0)

    if not half:
        return dist(u, v)
    # ADM computes the distances in float16 and falls back to float32 only when that overflows.
    d16 = dist(u.astype(jnp.float16), v.astype(jnp.float16))
    return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16.astype(jnp.float32),
                        lambda: dist(u, v))


@functools.partial(jax.jit, static_argnames=("k", "half"))
def _smallest_block(rows, cols, k: int, half: bool):
    d = _sq_distances(rows, cols, half)
    return -jax.lax.top_k(-d, min(k + 1, cols.shape[0]))[0]


@functools.partial(jax.jit, static_argnames=("half",))
def _inside_block(ref, ref_radii, sample, sample_radii, half: bool):
    d = _sq_distances(ref, sample, half)
    return (jnp.any(d <= sample_radii[None, :], axis=1), jnp.any(d <= ref_radii[:, None], axis=0))


def manifold_radii(features: np.ndarray, k: int = 3, block: int = 10000,
                   half: bool = True) -> np.ndarray:
    """Squared distance of each vector to its k-th nearest neighbour (itself excluded)."""
    feats = np.asarray(features, np.float32)
    if len(feats) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per set, "
                         f"got {len(feats)}.")
    radii = []
    for i in range(0, len(feats), block):
        rows = feats[i:i + block]
        parts = [np.asarray(_smallest_block(rows, feats[j:j + block], k, half))
                 for j in range(0, len(feats), block)]
        radii.append(np.sort(np.concatenate(parts, axis=1), axis=1)[:, k])  # [:, 0] is self
    return np.concatenate(radii)


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3,
                     block: int = 10000, half: bool = True) -> tuple[float, float]:
    """Improved precision (samples inside the reference manifold) and recall (reference
    inside the sample manifold); each manifold is the union of k-NN balls."""
    ref = np.asarray(ref_features, np.float32)
    sam = np.asarray(sample_features, np.float32)
    ref_r, sam_r = manifold_radii(ref, k, block, half), manifold_radii(sam, k, block, half)
    ref_in = np.zeros(len(ref), bool)
    sam_in = np.zeros(len(sam), bool)
    for i in range(0, len(ref), block):
        for j in range(0, len(sam), block):
            a, b = _inside_block(ref[i:i + block], ref_r[i:i + block], sam[j:j + block],
                                 sam_r[j:j + block], half)
            ref_in[i:i + block] |= np.asarray(a)
            sam_in[j:j + block] |= np.asarray(b)
    return float(sam_in.mean()), float(ref_in.mean())


# ----------------------------------------------------------------------------- .npz files
class NpzImages:
    """One array of an `.npz`, read front to back in slices without loading all of it
    (a 50K-sample batch at 256x256 is ~10 GB)."""

    def __init__(self, path: str, key: str = "arr_0"):
        self.path, self.key = path, key
        self._open()

    def _open(self):
        if getattr(self, "_npz", None) is not None:
            self._npz.close()
        self._npz = files.NpzFile(self.path, "image batch")
        if self.key not in self._npz:
            raise files.BadFileError(f"{self.path!r} has no array {self.key!r}; pass an "
                                     f"ADM-format .npz (images in {self.key!r}).")
        self._f, shape, fortran, dtype = self._npz.open(self.key)
        if fortran:
            raise files.BadFileError(f"{self.key!r} in {self.path!r} is not a plain C-order "
                                     "array; save it with np.savez.")
        self.shape, self.dtype, self._pos = tuple(shape), dtype, 0

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, s: slice) -> np.ndarray:
        start, stop, _ = s.indices(len(self))
        if start < self._pos:
            self._open()
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        if start > self._pos:
            files.read_exactly(self._f, (start - self._pos) * row, self.path, self.key)
        data = files.read_exactly(self._f, (stop - start) * row, self.path, self.key)
        self._pos = stop
        return np.frombuffer(data, self.dtype).reshape((stop - start,) + self.shape[1:])


def reference_from_features(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    mu, sigma = compute_statistics(features["pool"])
    mu_s, sigma_s = compute_statistics(features["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s,
            "pool": np.asarray(features["pool"], np.float32)}


def save_reference(path: str, reference: dict[str, np.ndarray]) -> None:
    """ADM-format statistics (plus `pool` activations); written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **{k: v for k, v in reference.items() if v is not None})
    os.replace(tmp, path)


def load_reference(path: str, network=None, batch_size: int = 200,
                   mesh=None) -> dict[str, np.ndarray]:
    """Statistics and `pool` activations of a reference `.npz`, running `network` (an
    `inception.FIDInception`) over its `arr_0` images only for what the file lacks."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference batch {path!r} does not exist; pass an ADM "
                                "reference .npz (e.g. VIRTUAL_imagenet256_labeled.npz).")
    with files.NpzFile(path, "reference batch") as f:
        ref = {k: f.read(k) for k in (*STAT_KEYS, "pool", "spatial") if k in f}
        has_images = "arr_0" in f
    for mu, sigma, acts in (("mu", "sigma", "pool"), ("mu_s", "sigma_s", "spatial")):
        if (mu not in ref or sigma not in ref) and acts in ref:
            ref[mu], ref[sigma] = compute_statistics(ref[acts])
    need_images = any(k not in ref for k in STAT_KEYS) or "pool" not in ref
    if need_images and has_images and network is not None:
        log.info("computing Inception features of the reference images in %s", path)
        computed = reference_from_features(network.features(NpzImages(path), batch_size, mesh))
        ref = {**computed, **ref}
    missing = [k for k in STAT_KEYS if k not in ref]
    if missing:
        raise ValueError(f"reference {path!r} lacks {missing} and has no images ('arr_0') to "
                         "compute them from; pass an ADM reference batch.")
    ref.pop("spatial", None)
    return ref


def image_metrics(sample_features: dict[str, np.ndarray],
                  reference: dict[str, np.ndarray]) -> dict[str, float]:
    """FID, sFID, IS and (when the reference has `pool` activations) precision/recall."""
    mu, sigma = compute_statistics(sample_features["pool"])
    mu_s, sigma_s = compute_statistics(sample_features["spatial"])
    result = {"fid": frechet_distance(mu, sigma, reference["mu"], reference["sigma"]),
              "sfid": frechet_distance(mu_s, sigma_s, reference["mu_s"], reference["sigma_s"]),
              "inception_score": inception_score(sample_features["logits"])}
    if "pool" in reference:
        result["precision"], result["recall"] = precision_recall(reference["pool"],
                                                                 sample_features["pool"])
    else:
        log.warning("the reference has no activations or images: precision/recall skipped")
    return result
