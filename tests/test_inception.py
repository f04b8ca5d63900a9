"""The FID InceptionV3: published architecture, weight-file contract, sharded features, CLI.

Random weights throughout (the real ones cannot be downloaded here). The network was checked
once against pytorch-fid's FID InceptionV3 loaded with the same random state dict: features
agreed to ~3e-6 relative (see the eval work's report).
"""
import json

import jax
import numpy as np
import pytest

from switch_dit_jax.eval import inception, metrics

# Name -> shape of tensors in pytorch-fid's pt_inception-2015-12-05-6726825d.pth, written out
# independently of the code under test (a representative subset of its 472 tensors).
PUBLISHED = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_2a_3x3.conv.weight": (32, 32, 3, 3),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
    "Mixed_5d.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
    "Mixed_6c.branch7x7_1.conv.weight": (160, 768, 1, 1),
    "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
    "Mixed_6d.branch1x1.bn.bias": (192,),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
NUM_TENSORS = 472  # 94 conv+BN units x 5 tensors + fc weight and bias (no num_batches_tracked)
NUM_PARAMETERS = 23_850_960  # conv weights + BN scale/shift + fc; BN running stats excluded


@pytest.fixture(scope="module")
def state_dict():
    return inception.random_state_dict(seed=0)


@pytest.fixture(scope="module")
def net(state_dict):
    return inception.FIDInception(inception.params_from_state_dict(state_dict))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, state_dict):
    path = str(tmp_path_factory.mktemp("weights") / "fid_inception_v3.npz")
    np.savez(path, **state_dict)
    return path


def test_architecture_is_the_published_fid_inception():
    shapes = inception.expected_shapes()
    assert len(shapes) == NUM_TENSORS
    for name, shape in PUBLISHED.items():
        assert shapes[name] == shape, name
    learnable = sum(int(np.prod(s)) for k, s in shapes.items()
                    if not k.endswith(("running_mean", "running_var")))
    assert learnable == NUM_PARAMETERS


def test_preprocessing_follows_the_tf_graph():
    # TF1 ResizeBilinear(align_corners=False): source = dest * in/out, clamped at the edge.
    np.testing.assert_allclose(inception.tf1_resize_matrix(2, 4),
                               [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
    np.testing.assert_array_equal(inception.tf1_resize_matrix(299, 299), np.eye(299))
    x = np.full((1, 299, 299, 3), [0, 128, 255], np.uint8)
    np.testing.assert_array_equal(np.asarray(inception.preprocess(x))[0, 0, 0],
                                  [-1.0, 0.0, 127 / 128])
    assert inception.preprocess(np.zeros((2, 8, 8, 1), np.uint8)).shape == (2, 299, 299, 3)


def test_features_on_299_and_resized_inputs_sharded_and_padded(net):
    assert jax.device_count() == 8  # batches are split over the simulated devices
    small = np.random.default_rng(0).integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    a = net.features(small, batch_size=8)  # resized; two batches, the second zero-padded
    assert {k: v.shape for k, v in a.items()} == {"pool": (10, 2048), "spatial": (10, 2023),
                                                  "logits": (10, 1008)}
    # The same pixels given at 299x299 (floats in [0, 255]) skip the resize and must agree,
    # in a batch of 3 padded to 8.
    big = np.asarray(inception.preprocess(small[:3])) * 128.0 + 128.0
    b = net.features(big, batch_size=8)
    for key in a:
        assert np.all(np.isfinite(a[key]))
        np.testing.assert_allclose(a[key][:3], b[key], rtol=1e-4, atol=1e-5)
    assert np.all(a["pool"] >= 0) and np.std(a["pool"]) > 0  # a mean of ReLUs, not constant


def test_spatial_features_are_the_first_7_channels_of_mixed_6d(net):
    # The network is fully convolutional: a 139x139 input keeps compute small (Mixed_6d: 7x7).
    x = np.random.default_rng(1).uniform(-1, 1, (1, 139, 139, 3)).astype(np.float32)
    model = inception.InceptionV3()
    out, state = jax.jit(lambda p, x: model.apply(
        p, x, capture_intermediates=lambda m, _: m.name == "Mixed_6d"))({"params": net.params}, x)
    mixed_6d = state["intermediates"]["Mixed_6d"]["__call__"][0]
    assert mixed_6d.shape == (1, 7, 7, 768)
    np.testing.assert_array_equal(out["spatial"], mixed_6d[..., :7].reshape(1, 7 * 7 * 7))
    assert out["pool"].shape == (1, 2048)


def test_weight_file_round_trips(weights_file, net):
    params = inception.load_params(weights_file)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(net.params)):
        np.testing.assert_array_equal(a, b)
    assert params["Mixed_6d"]["branch1x1"]["kernel"].shape == (1, 1, 768, 192)  # HWIO


def test_wrong_shape_is_refused_by_name(state_dict):
    bad = dict(state_dict, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(ValueError, match=r"'fc\.weight'.*\[1000, 2048\].*\[1008, 2048\]"):
        inception.params_from_state_dict(bad)


def test_missing_or_unknown_tensor_is_refused_by_name(state_dict, tmp_path):
    missing = {k: v for k, v in state_dict.items()
               if k != "Mixed_6d.branch1x1.bn.running_var"}
    path = str(tmp_path / "missing.npz")
    np.savez(path, **missing)
    with pytest.raises(ValueError, match=r"lacks tensor 'Mixed_6d\.branch1x1\.bn\.running_var'"):
        inception.load_params(path)
    extra = dict(state_dict, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    with pytest.raises(ValueError, match=r"'AuxLogits\.fc\.weight'"):
        inception.params_from_state_dict(extra)
    ok = dict(state_dict, **{"Conv2d_1a_3x3.bn.num_batches_tracked": np.array(0)})
    inception.params_from_state_dict(ok)
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        inception.load_params(str(tmp_path / "nowhere.npz"))
    with pytest.raises(ValueError, match="not an .npz.*np.savez"):
        (tmp_path / "w.pth").write_bytes(b"")
        inception.load_params(str(tmp_path / "w.pth"))


def _cheap_frechet(mu1, sigma1, mu2, sigma2):
    # sqrtm of a 2048x2048 product takes about a minute on a 2-core CI machine; the exact
    # function is tested in test_eval_metrics.py, this only checks what reaches it.
    assert sigma1.shape == sigma2.shape and sigma1.shape[0] in (2048, 2023)
    d1, d2 = np.diag(sigma1), np.diag(sigma2)
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2)))


def test_cli_and_evaluate_samples_write_all_metrics(weights_file, tmp_path, monkeypatch):
    from switch_dit_jax import eval as ev
    from switch_dit_jax.eval import __main__ as cli
    monkeypatch.setattr(metrics, "frechet_distance", _cheap_frechet)
    rng = np.random.default_rng(2)
    samples, ref = str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz")
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    np.savez(samples, arr_0=images, arr_1=np.arange(8))
    np.savez(ref, arr_0=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    out, saved = str(tmp_path / "m" / "metrics.json"), str(tmp_path / "ref_stats.npz")
    cli.main([samples, ref, "--inception_weights", weights_file, "--out", out,
              "--batch_size", "8", "--save_reference", saved])
    with open(out, encoding="utf-8") as f:
        result = json.load(f)
    assert set(metrics.METRIC_KEYS) <= set(result) and result["num_samples"] == 8
    assert all(np.isfinite(result[k]) for k in metrics.METRIC_KEYS)
    with np.load(saved) as f:
        assert set(f.files) == {"mu", "sigma", "mu_s", "sigma_s", "pool"}

    workdir = str(tmp_path / "workdir")
    got = ev.evaluate_samples(images, np.arange(8), data_name="imagenet", workdir=workdir,
                              reference_npz=ref, inception_weights=weights_file, batch_size=8)
    assert set(got) == set(metrics.METRIC_KEYS)
    for key in metrics.METRIC_KEYS:
        assert got[key] == pytest.approx(result[key], rel=1e-4, abs=1e-6)
    cached = list((tmp_path / "workdir" / "eval_cache").glob("reference_*.npz"))
    assert len(cached) == 1  # the reference batch's features are computed once per run
    with pytest.raises(ValueError, match="reference_npz=None"):
        ev.evaluate_samples(images, None, data_name="imagenet", workdir=workdir)
