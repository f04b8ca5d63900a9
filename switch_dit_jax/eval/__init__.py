"""Evaluation: the FID Inception network (`inception`), FID / sFID / IS / precision / recall
(`metrics`), digits quality (`digits`), text-to-image FID and CLIP score (`t2i`), and
`evaluate_samples`, the one call that training and `--mode=eval` make. CLI: `python -m
switch_dit_jax.eval samples.npz ref.npz --out m.json`.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os

import numpy as np

from switch_dit_jax import files

log = logging.getLogger("switch_dit_jax")


def load_network(weights_path: str):
    """The FID Inception network of a weight file; a truncated, corrupt or pickled file is one
    sentence naming it (NumPy's own errors name no path)."""
    from switch_dit_jax.eval import inception
    if not (os.path.isfile(weights_path) and weights_path.endswith(".npz")):
        return inception.FIDInception.load(weights_path)  # its sentences for these cases
    state_dict = files.load_npz(weights_path, "Inception weight file")
    return inception.FIDInception(inception.params_from_state_dict(
        state_dict, f"Inception weight file {weights_path!r}"))


@functools.lru_cache(maxsize=2)
def _network(weights_path: str):
    return load_network(weights_path)  # kept: its compiled functions are reused


def _file_identity(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def _agree_across_processes(flag: bool) -> bool:
    """Process 0's answer, so that every process takes the same branch into collectives."""
    import jax
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def reference_statistics(reference_npz: str, inception_weights: str, workdir: str | None,
                         batch_size: int = 200, mesh=None) -> dict[str, np.ndarray]:
    """`metrics.load_reference`, cached in `workdir/eval_cache/` when the reference images
    had to be run through the network (ADM's batches lack the `pool` activations)."""
    import jax

    from switch_dit_jax.eval import metrics
    if not os.path.isfile(reference_npz):
        raise FileNotFoundError(f"reference batch {reference_npz!r} does not exist; pass an ADM "
                                "reference .npz (e.g. VIRTUAL_imagenet256_labeled.npz).")
    network = _network(inception_weights)
    with files.NpzFile(reference_npz, "reference batch") as f:
        complete = all(k in f for k in (*metrics.STAT_KEYS, "pool"))
    if complete or not workdir:
        return metrics.load_reference(reference_npz, network, batch_size, mesh)
    key = hashlib.sha1((_file_identity(reference_npz) + "|" + _file_identity(inception_weights))
                       .encode()).hexdigest()[:16]
    cache = os.path.join(workdir, "eval_cache", f"reference_{key}.npz")
    if _agree_across_processes(os.path.exists(cache)):
        return files.load_npz(cache, "cached reference statistics")
    reference = metrics.load_reference(reference_npz, network, batch_size, mesh)
    if jax.process_index() == 0:
        metrics.save_reference(cache, reference)
        log.info("cached the reference statistics of %s in %s", reference_npz, cache)
    return reference


def evaluate_samples(images_uint8_nhwc: np.ndarray, labels: np.ndarray, *, data_name: str,
                     workdir: str, reference_npz: str | None = None,
                     inception_weights: str | None = None, batch_size: int = 200,
                     mesh=None) -> dict[str, float]:
    """Quality metrics of generated images (every process passes the same images).

    digits: `digits_classifier_accuracy`, `digits_fd`. Other data: `fid`, `sfid`,
    `inception_score`, `precision`, `recall` against an ADM reference batch (FID-N for the N
    images given); needs `reference_npz` and `inception_weights` (see `eval/inception.py`).
    Inception features are computed in batches of `batch_size` split over the devices of
    `mesh` (default: all devices).
    """
    if data_name == "digits":
        from switch_dit_jax.eval import digits
        return digits.digits_metrics(images_uint8_nhwc, labels, workdir)
    if not reference_npz or not inception_weights:
        raise ValueError(f"FID metrics of {data_name!r} samples need both a reference batch and "
                         f"Inception weights, got reference_npz={reference_npz!r} and "
                         f"inception_weights={inception_weights!r}; set both (the weight file "
                         "format is described in switch_dit_jax/eval/inception.py).")
    from switch_dit_jax.eval import metrics
    network = _network(inception_weights)
    reference = reference_statistics(reference_npz, inception_weights, workdir, batch_size,
                                     mesh)
    features = network.features(images_uint8_nhwc, batch_size, mesh)
    return metrics.image_metrics(features, reference)
