"""FID / IS / precision-recall against closed forms and ADM's algorithm; reference files."""
import numpy as np
import pytest

from switch_dit_jax.eval import metrics


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_identical_statistics_is_zero():
    acts = np.random.default_rng(1).standard_normal((200, 32))
    mu, sigma = metrics.compute_statistics(acts)
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def _stable_trace_sqrt(s1, s2):
    """tr sqrt(s1 s2) = tr sqrt(s1^1/2 s2 s1^1/2), through symmetric eigendecompositions."""
    e, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(e, 0, None))) @ v.T
    return np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)))


def test_frechet_distance_stays_finite_for_near_singular_covariances():
    rng = np.random.default_rng(2)  # 10 samples in 64 dims: rank-9 covariances
    mu1, s1 = metrics.compute_statistics(rng.standard_normal((10, 64)))
    mu2, s2 = metrics.compute_statistics(rng.standard_normal((10, 64)) + 0.3)
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                - 2 * _stable_trace_sqrt(s1, s2))
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_offsets_a_product_without_square_root():
    # [[0, 1], [0, 0]] has no square root (sqrtm gives inf): the eps*I offset must kick in.
    s1, s2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
    assert np.isfinite(metrics.frechet_distance(np.zeros(2), s1, np.zeros(2), s2))


def test_frechet_distance_refuses_mismatched_sizes():
    with pytest.raises(ValueError, match="different feature sizes"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_of_uniform_predictions_is_one():
    assert metrics.inception_score(np.zeros((50, 1008))) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_num_classes():
    k = 4
    logits = 40.0 * np.eye(k)[np.arange(40) % k]  # every split of 4 holds each class once
    assert metrics.inception_score(logits, num_splits=10) == pytest.approx(k, rel=1e-6)


def test_inception_score_by_hand():
    p = np.array([[0.75, 0.25], [0.25, 0.75]] * 10)  # marginal (0.5, 0.5) in each split
    kl = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
    assert metrics.inception_score(np.log(p), num_splits=10) == pytest.approx(np.exp(kl))


def _adm_precision_recall(ref, sample, k=3):
    """ADM's ManifoldEstimator in plain NumPy (one block)."""
    def dist(u, v):
        return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None], 0)
    r_ref = np.partition(dist(ref, ref), k, axis=1)[:, k]
    r_sam = np.partition(dist(sample, sample), k, axis=1)[:, k]
    d = dist(ref, sample)
    return np.mean(np.any(d <= r_ref[:, None], axis=0)), np.mean(np.any(d <= r_sam, axis=1))


@pytest.mark.parametrize("half", [True, False])
def test_precision_recall_equals_adm_algorithm_across_blocks(half):
    rng = np.random.default_rng(3)  # small integers: distances are exact, even in float16
    ref = rng.integers(-3, 4, (20, 8)).astype(np.float32)
    sample = (rng.integers(-3, 4, (20, 8)) + (np.arange(20) % 2)[:, None] * 2).astype(np.float32)
    got = metrics.precision_recall(ref, sample, k=3, block=10, half=half)
    assert got == pytest.approx(_adm_precision_recall(ref, sample), abs=0)


def test_precision_recall_on_point_clouds_with_known_overlap():
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((60, 16)).astype(np.float32)
    far = ref + 1000.0
    assert metrics.precision_recall(ref, ref.copy()) == (1.0, 1.0)
    assert metrics.precision_recall(ref, far) == (0.0, 0.0)
    # samples = the reference plus as many far points: half the samples are real, all of the
    # reference is covered
    assert metrics.precision_recall(ref, np.concatenate([ref, far])) == (0.5, 1.0)


def test_manifold_radii_are_squared_kth_neighbour_distances():
    points = np.arange(10, dtype=np.float32)[:, None]  # 1-D grid
    radii = metrics.manifold_radii(points, k=2, block=4, half=False)
    assert radii[5] == 1.0 and radii[0] == 4.0  # neighbours of 5: 4, 6; of 0: 1, 2
    with pytest.raises(ValueError, match="k=3 needs more than 3 images"):
        metrics.manifold_radii(points[:3], k=3)


def test_reference_files_round_trip_and_adm_keys(tmp_path):
    rng = np.random.default_rng(5)
    feats = {"pool": rng.standard_normal((20, 6)), "spatial": rng.standard_normal((20, 5))}
    ref = metrics.reference_from_features(feats)
    path = str(tmp_path / "ref.npz")
    metrics.save_reference(path, ref)
    with np.load(path) as f:
        assert set(f.files) == {"mu", "sigma", "mu_s", "sigma_s", "pool"}
    loaded = metrics.load_reference(path)
    for key in ref:
        np.testing.assert_allclose(loaded[key], ref[key], rtol=1e-6)

    # ADM-style: statistics only -> no activations, precision/recall skipped
    adm = str(tmp_path / "adm.npz")
    np.savez(adm, **{k: ref[k] for k in metrics.STAT_KEYS})
    loaded = metrics.load_reference(adm)
    assert "pool" not in loaded
    sample = {"pool": feats["pool"] + 1, "spatial": feats["spatial"],
              "logits": rng.standard_normal((20, 10))}
    assert set(metrics.image_metrics(sample, loaded)) == {"fid", "sfid", "inception_score"}
    assert set(metrics.image_metrics(sample, ref)) == set(metrics.METRIC_KEYS)

    # activations only -> statistics computed from them
    acts = str(tmp_path / "acts.npz")
    np.savez(acts, pool=feats["pool"], spatial=feats["spatial"])
    np.testing.assert_allclose(metrics.load_reference(acts)["sigma_s"], ref["sigma_s"])

    empty = str(tmp_path / "empty.npz")
    np.savez(empty, mu=ref["mu"])
    with pytest.raises(ValueError, match=r"lacks \['sigma', 'mu_s', 'sigma_s'\]"):
        metrics.load_reference(empty)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        metrics.load_reference(str(tmp_path / "missing.npz"))


def test_npz_images_reads_slices_without_loading_everything(tmp_path):
    images = np.random.default_rng(6).integers(0, 256, (11, 4, 5, 3), dtype=np.uint8)
    path = str(tmp_path / "samples.npz")
    np.savez(path, arr_0=images, arr_1=np.arange(11))
    reader = metrics.NpzImages(path)
    assert len(reader) == 11 and reader.shape == images.shape
    np.testing.assert_array_equal(reader[0:4], images[0:4])
    np.testing.assert_array_equal(reader[6:11], images[6:11])  # skips ahead
    np.testing.assert_array_equal(reader[2:5], images[2:5])  # goes back: reopens
    with pytest.raises(ValueError, match="no array 'images'"):
        metrics.NpzImages(path, key="images")


class _StubNetwork:
    """Stands in for the Inception network: features are slices of the pixels."""

    def features(self, images, batch_size, mesh):
        x = np.asarray(images[0:len(images)], np.float64).reshape(len(images), -1)
        return {"pool": x[:, :6], "spatial": x[:, 6:11], "logits": x[:, :3]}


def test_adm_reference_keeps_stored_statistics_and_computes_activations(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, (20, 4, 4, 1), dtype=np.uint8)
    path = str(tmp_path / "VIRTUAL_ref.npz")
    stored = {"mu": np.ones(6), "sigma": np.eye(6), "mu_s": np.ones(5), "sigma_s": np.eye(5)}
    np.savez(path, arr_0=images, **stored)
    ref = metrics.load_reference(path, _StubNetwork())
    for key, value in stored.items():
        np.testing.assert_array_equal(ref[key], value)  # the file's statistics win, as in ADM
    np.testing.assert_array_equal(ref["pool"], images.reshape(20, -1)[:, :6])
