"""Quality of generated digits, judged by a small classifier trained on the real digits:

* accuracy: does it recognise each class-conditional sample as its label?
* digits_fd: the Fréchet distance between its hidden features (128-d, after ReLU) of the
  samples and of all 1797 real digits (the data the generator learns) — FID in miniature.

The classifier is a scikit-learn MLP fitted with a fixed seed on a fixed 80% split of the
bundled digits. Given a workdir, its weights are stored once in
`workdir/eval_cache/digits_classifier.npz` and read back afterwards, so every evaluation of
that run uses the same classifier even if a different BLAS would fit a slightly different
one; the metrics are then a function of the samples alone.
"""
from __future__ import annotations

import functools
import os

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from switch_dit_jax.eval.metrics import compute_statistics, frechet_distance
from switch_dit_jax.errors import BadFileError
from switch_dit_jax.files import load_npz

CACHE_FILE = os.path.join("eval_cache", "digits_classifier.npz")
WEIGHT_KEYS = ("w0", "b0", "w1", "b1")


def to_digit_features(images: np.ndarray) -> np.ndarray:
    """[N, 8, 8, 1] images (uint8 0..255 or floats in [-1, 1]) -> [N, 64] in the 0..16 scale
    of the real digits."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1:] != (8, 8, 1):
        raise ValueError(f"digit samples must be [N, 8, 8, 1], got {x.shape}.")
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else (x.astype(np.float64) + 1) / 2
    return np.clip(x, 0, 1).reshape(len(x), 64) * 16.0


def real_digits_split(seed: int = 0):
    """(train_x, test_x, train_y, test_y) of the real digits, x on the 0..16 scale."""
    digits = load_digits()
    return train_test_split(digits.data, digits.target, test_size=0.2, random_state=seed,
                            stratify=digits.target)


@functools.lru_cache(maxsize=1)
def digits_classifier() -> MLPClassifier:
    train_x, _, train_y, _ = real_digits_split()
    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=0)
    # Threads only add overhead on these tiny matrices (10x slower on a 2-core machine).
    with threadpool_limits(limits=1):
        return clf.fit(train_x / 16.0, train_y)


def classifier_weights(workdir: str | None = None) -> dict[str, np.ndarray]:
    """The classifier's weights, from the workdir cache when there is one (written on first
    use), else fitted in this process."""
    path = os.path.join(workdir, CACHE_FILE) if workdir else None
    if path and os.path.exists(path):
        weights = load_npz(path, "digits classifier cache", keys=WEIGHT_KEYS)
        if len(weights) == len(WEIGHT_KEYS):
            return weights
        raise BadFileError(f"{path!r} is not a digits classifier cache (it lacks {WEIGHT_KEYS}); "
                         "delete it and it will be rebuilt.")
    clf = digits_classifier()
    weights = dict(zip(WEIGHT_KEYS, (clf.coefs_[0], clf.intercepts_[0], clf.coefs_[1],
                                     clf.intercepts_[1])))
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"  # several hosts may write the same content
        np.savez(tmp, **weights)
        os.replace(tmp, path)
    return weights


def _hidden(x16: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    return np.maximum(x16 / 16.0 @ w["w0"] + w["b0"], 0.0)


def _predict(x16: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    # The MLP's classes are 0..9 in order, so the argmax of its output layer is its prediction.
    return np.argmax(_hidden(x16, w) @ w["w1"] + w["b1"], axis=1)


def classifier_accuracy(images: np.ndarray, labels: np.ndarray,
                        workdir: str | None = None) -> float:
    """Fraction of samples the real-digits classifier assigns to their conditioning label."""
    pred = _predict(to_digit_features(images), classifier_weights(workdir))
    return float(np.mean(pred == np.asarray(labels)))


def digits_fd(images: np.ndarray, workdir: str | None = None) -> float:
    """Fréchet distance between the classifier's hidden features of the samples and of all
    real digits."""
    w = classifier_weights(workdir)
    mu_r, sigma_r = compute_statistics(_hidden(load_digits().data, w))  # milliseconds
    mu, sigma = compute_statistics(_hidden(to_digit_features(images), w))
    return frechet_distance(mu, sigma, mu_r, sigma_r)


def digits_metrics(images: np.ndarray, labels: np.ndarray,
                   workdir: str | None = None) -> dict[str, float]:
    return {"digits_classifier_accuracy": classifier_accuracy(images, labels, workdir),
            "digits_fd": digits_fd(images, workdir)}
