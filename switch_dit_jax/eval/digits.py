"""Quality of generated digits: does a classifier trained on the real digits recognise each
class-conditional sample as its label?

The classifier is a scikit-learn MLP fitted with a fixed seed on a fixed 80% split of the
1797 bundled digits; it is deterministic, so the accuracy is a function of the samples alone.
"""
from __future__ import annotations

import functools

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier


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
    return clf.fit(train_x / 16.0, train_y)


def classifier_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples the real-digits classifier assigns to their conditioning label."""
    pred = digits_classifier().predict(to_digit_features(images) / 16.0)
    return float(np.mean(pred == np.asarray(labels)))
