"""T2I evaluation: FID against the validation reference and the chunked CLIP score, with a
small closed-form feature network and a fake CLIP scorer (the real networks are tested in
test_inception.py and the text package)."""
import json
import zlib

import numpy as np
import pytest

from switch_dit_jax import eval as eval_pkg
from switch_dit_jax.errors import BadFileError
from switch_dit_jax.eval import t2i

N = 12


class ChannelStats:
    """pool: channel means; spatial: mean of the top and bottom halves; logits: a fixed map."""

    def features(self, images, batch_size=200, mesh=None):
        x = np.asarray(images[0:len(images)], np.float64) / 255
        pool = x.mean(axis=(1, 2))
        h = x.shape[1] // 2
        spatial = np.stack([x[:, :h].mean(axis=(1, 2, 3)), x[:, h:].mean(axis=(1, 2, 3))], 1)
        logits = pool @ np.arange(12.0).reshape(3, 4)
        return {"pool": pool, "spatial": spatial, "logits": logits}


def fid_closed_form(a, b):
    """FID from eigenvalues: tr sqrt(s1 s2) = sum sqrt(eig(sqrt(s1) s2 sqrt(s1)))."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ s2 @ root)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def per_image_score(image, text):
    return image.mean() / 255 * 50 + zlib.crc32(text.encode()) % 7


def fake_scorer(calls):
    def score(images, texts, model_dir, batch_size):
        calls.append(len(images))
        assert len(images) == len(texts) and model_dir.endswith("clip")
        return float(np.mean([per_image_score(i, t) for i, t in zip(images, texts)]))
    return score


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (N, 8, 8, 3), np.uint8)
    reference = rng.integers(40, 200, (N, 8, 8, 3), np.uint8)
    prompts = np.asarray([f"prompt number {i}" for i in range(N)])
    paths = {"samples": str(tmp_path / "samples.npz"), "reference": str(tmp_path / "ref.npz"),
             "clip": str(tmp_path / "clip")}
    np.savez(paths["samples"], arr_0=samples, prompts=prompts)
    np.savez(paths["reference"], arr_0=reference)
    (tmp_path / "clip").mkdir()
    return paths, samples, reference, list(prompts)


def test_fid_and_clip_score(files):
    paths, samples, reference, prompts = files
    calls = []
    result = t2i.evaluate_t2i(paths["samples"], paths["reference"], paths["clip"],
                              ChannelStats(), clip_scorer=fake_scorer(calls), batch_size=5)
    net = ChannelStats()
    want = fid_closed_form(net.features(samples)["pool"], net.features(reference)["pool"])
    assert result["fid"] == pytest.approx(want, rel=1e-6)
    assert result["num_samples"] == N
    assert {"sfid", "inception_score", "precision", "recall"} <= set(result)
    mean = np.mean([per_image_score(i, p) for i, p in zip(samples, prompts)])
    assert result["clip_score"] == pytest.approx(mean, rel=1e-9)
    calls.clear()
    chunked = t2i.mean_clip_score(samples, prompts, paths["clip"], fake_scorer(calls),
                                  chunk=5)
    assert calls == [5, 5, 2] and chunked == pytest.approx(mean, rel=1e-9)


def test_cli_writes_json(files, tmp_path, monkeypatch, capsys):
    paths, *_ = files
    monkeypatch.setattr(eval_pkg, "load_network", lambda path: ChannelStats())
    monkeypatch.setattr(t2i, "_default_scorer", fake_scorer([]))
    out = str(tmp_path / "m" / "t2i.json")
    printed = t2i.main([f"--samples={paths['samples']}", f"--reference={paths['reference']}",
                        f"--text_encoder={paths['clip']}", "--inception_weights=w.npz",
                        f"--out={out}"])
    with open(out, encoding="utf-8") as f:
        written = json.load(f)
    assert written["fid"] == printed["fid"] and np.isfinite(written["clip_score"])
    assert json.loads(capsys.readouterr().out)["num_samples"] == N


def test_bad_inputs(files, tmp_path):
    paths, samples, *_ = files
    no_prompts = str(tmp_path / "labels.npz")
    np.savez(no_prompts, arr_0=samples, arr_1=np.arange(N))
    with pytest.raises(BadFileError, match="has no 'prompts' array"):
        t2i.evaluate_t2i(no_prompts, paths["reference"], paths["clip"], ChannelStats())
    short = str(tmp_path / "short.npz")
    np.savez(short, arr_0=samples, prompts=np.asarray(["a", "b"]))
    with pytest.raises(BadFileError, match="and 2 prompts; it needs uint8"):
        t2i.evaluate_t2i(short, paths["reference"], paths["clip"], ChannelStats())
    with pytest.raises(FileNotFoundError, match="--text_encoder=.*nowhere' is not a directory"):
        t2i.evaluate_t2i(paths["samples"], paths["reference"], str(tmp_path / "nowhere"),
                         ChannelStats())
    with pytest.raises(FileNotFoundError, match="--reference=.*gone.npz' does not exist"):
        t2i.evaluate_t2i(paths["samples"], str(tmp_path / "gone.npz"), paths["clip"],
                         ChannelStats())
