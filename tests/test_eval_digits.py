"""Digits quality: classifier accuracy and Fréchet distance in the classifier's features."""
import os

import numpy as np
import pytest

from switch_dit_jax import eval as ev
from switch_dit_jax.eval import digits


def _as_samples(x16: np.ndarray) -> np.ndarray:
    """Real digits (0..16 scale, [N, 64]) as uint8 [N, 8, 8, 1] samples."""
    return np.round(x16 / 16.0 * 255).astype(np.uint8).reshape(-1, 8, 8, 1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("workdir"))


@pytest.fixture(scope="module")
def held_out():
    _, test_x, _, test_y = digits.real_digits_split()
    return _as_samples(test_x), test_y


def test_real_digits_score_high_and_noise_scores_chance(workdir, held_out):
    images, labels = held_out
    real = ev.evaluate_samples(images, labels, data_name="digits", workdir=workdir)
    assert set(real) == {"digits_classifier_accuracy", "digits_fd"}
    assert real["digits_classifier_accuracy"] >= 0.9
    noise_images = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    noise = ev.evaluate_samples(noise_images, labels, data_name="digits", workdir=workdir)
    assert noise["digits_classifier_accuracy"] < 0.2  # chance is 0.1
    assert 0 < real["digits_fd"] < 1.0
    assert noise["digits_fd"] > 10 * real["digits_fd"]
    # float samples in [-1, 1] are read like uint8 ones
    as_float = images.astype(np.float64) / 255.0 * 2 - 1
    assert digits.digits_fd(as_float, workdir) == pytest.approx(real["digits_fd"], rel=1e-9)


def test_classifier_is_cached_in_the_workdir_and_deterministic(workdir, held_out):
    images, labels = held_out
    first = digits.digits_metrics(images, labels, workdir)
    path = os.path.join(workdir, "eval_cache", "digits_classifier.npz")
    assert os.path.exists(path)
    with np.load(path) as f:
        assert {k: f[k].shape for k in f.files} == {"w0": (64, 128), "b0": (128,),
                                                    "w1": (128, 10), "b1": (10,)}
    assert digits.digits_metrics(images, labels, workdir) == first
    # the cached weights are the ones used: the unchanged API without a workdir agrees
    assert digits.classifier_accuracy(images, labels) == first["digits_classifier_accuracy"]


def test_a_foreign_cache_file_is_refused_by_name(tmp_path, held_out):
    os.makedirs(tmp_path / "eval_cache")
    np.savez(tmp_path / "eval_cache" / "digits_classifier.npz", something=np.zeros(3))
    with pytest.raises(ValueError, match="digits_classifier.npz.*delete it"):
        digits.digits_fd(held_out[0], str(tmp_path))


def test_wrong_digit_shape_is_refused():
    with pytest.raises(ValueError, match=r"\[N, 8, 8, 1\], got \(2, 8, 8, 3\)"):
        digits.classifier_accuracy(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2))
