"""Text-to-image evaluation: FID of prompted samples against the COCO validation images, and
the CLIP score of the samples against their prompts.

    python -m switch_dit_jax.eval.t2i --samples=samples_00400000.npz \
        --reference=/data/coco256_val/val_reference_256.npz \
        --text_encoder=/weights/clip-vit-large-patch14 \
        --inception_weights=fid_inception_v3.npz --out=t2i_metrics.json

The samples file is what prompt sampling writes (`arr_0` uint8 [N, H, W, 3], `prompts` str
[N]); the reference is the ADM-format batch of `python -m switch_dit_jax.data.coco`. FID, sFID,
IS and precision/recall come from the class-conditional evaluator (`eval.metrics`); the CLIP
score is `switch_dit_jax.text.clip_score` (mean of 100·max(cos, 0)) over the same CLIP.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from switch_dit_jax import cli, files

log = logging.getLogger("switch_dit_jax")

CLIP_CHUNK = 1000  # images handed to the CLIP scorer at once: 50K at 256² would be ~10 GB


def _default_scorer(images, texts, model_dir, batch_size):
    from switch_dit_jax.text import clip_score  # lazy: loads the CLIP vision and text towers
    return clip_score(images, texts, model_dir, batch_size=batch_size)


def read_prompts(samples_npz: str) -> list[str]:
    with files.NpzFile(samples_npz, "sample batch") as f:
        if "prompts" not in f:
            raise files.BadFileError(f"{samples_npz!r} has no 'prompts' array; pass samples "
                                     "written by prompt sampling (config.sample.prompts).")
        prompts = f.read("prompts")
    if prompts.dtype.kind != "U" or prompts.ndim != 1:
        raise files.BadFileError(f"'prompts' in {samples_npz!r} is {prompts.dtype} "
                                 f"{prompts.shape}, not a 1-D array of strings.")
    return [str(p) for p in prompts]


def mean_clip_score(images, prompts, clip_dir: str, scorer=None, batch_size: int = 64,
                    chunk: int = CLIP_CHUNK) -> float:
    """The CLIP score over all images, scored `chunk` at a time (a chunk-size-weighted mean of
    per-chunk means is the mean over all)."""
    scorer = scorer or _default_scorer
    n, total = len(images), 0.0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        part = np.asarray(images[start:stop])
        total += float(scorer(part, prompts[start:stop], clip_dir, batch_size)) * (stop - start)
    return total / n


def evaluate_t2i(samples_npz: str, reference_npz: str, clip_dir: str, inception=None, *,
                 clip_scorer=None, batch_size: int = 200, clip_batch_size: int = 64) -> dict:
    """{"fid", "sfid", "inception_score", "precision", "recall", "clip_score", "num_samples"}.

    `inception`: the FID Inception weight file (default $FID_INCEPTION_WEIGHTS) or a network
    with `.features(images, batch_size)`. `clip_scorer(images, texts, clip_dir, batch_size)`
    overrides `switch_dit_jax.text.clip_score`.
    """
    from switch_dit_jax.eval import load_network, metrics
    inception = inception or os.environ.get("FID_INCEPTION_WEIGHTS")
    if not inception:
        raise ValueError("no Inception weights: pass --inception_weights PATH.npz or set "
                         "$FID_INCEPTION_WEIGHTS (see switch_dit_jax/eval/inception.py).")
    for what, path in (("--samples", samples_npz), ("--reference", reference_npz)):
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"{what}={path!r} does not exist; pass an ADM-format .npz.")
    if not clip_dir or not os.path.isdir(clip_dir):
        raise FileNotFoundError(f"--text_encoder={clip_dir!r} is not a directory; pass the "
                                "Hugging Face CLIP directory the model was trained with.")
    prompts = read_prompts(samples_npz)
    samples = metrics.NpzImages(samples_npz)
    if len(samples) != len(prompts) or len(samples.shape) != 4 or samples.dtype != np.uint8:
        raise files.BadFileError(f"{samples_npz!r} holds arr_0 {samples.dtype} {samples.shape} "
                                 f"and {len(prompts)} prompts; it needs uint8 [N, H, W, 3] "
                                 "images, one per prompt.")
    network = load_network(inception) if isinstance(inception, str) else inception
    reference = metrics.load_reference(reference_npz, network, batch_size)
    result = metrics.image_metrics(network.features(samples, batch_size), reference)
    result["clip_score"] = mean_clip_score(samples, prompts, clip_dir, clip_scorer,
                                           clip_batch_size)
    result["num_samples"] = len(samples)
    return result


def main(argv=None) -> dict:
    p = cli.parser("switch_dit_jax.eval.t2i", __doc__)
    p.add_argument("--samples", required=True, help="samples .npz (arr_0 uint8, prompts)")
    p.add_argument("--reference", required=True, help="val_reference_<size>.npz (ADM format)")
    p.add_argument("--text_encoder", required=True, help="Hugging Face CLIP directory")
    p.add_argument("--inception_weights", default=os.environ.get("FID_INCEPTION_WEIGHTS"),
                   help="FID Inception weights .npz (default: $FID_INCEPTION_WEIGHTS)")
    p.add_argument("--batch_size", type=int, default=200, help="Inception images per step")
    p.add_argument("--clip_batch_size", type=int, default=64, help="CLIP images per step")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    args = cli.parse(p, argv)
    start = time.time()
    result = evaluate_t2i(args.samples, args.reference, args.text_encoder,
                          args.inception_weights, batch_size=args.batch_size,
                          clip_batch_size=args.clip_batch_size)
    result.update(samples=args.samples, reference=args.reference,
                  text_encoder=args.text_encoder, seconds=round(time.time() - start, 1))
    cli.report_json(result, args.out)
    return result


if __name__ == "__main__":
    cli.run(main)
