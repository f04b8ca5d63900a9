"""FID, sFID, Inception Score, precision and recall of a sample batch against a reference
batch, both ADM-format `.npz` files (images in `arr_0`, uint8 NHWC):

    python -m switch_dit_jax.eval samples.npz VIRTUAL_imagenet256_labeled.npz \
        --inception_weights fid_inception_v3.npz --out metrics.json

The weight file is described in `switch_dit_jax/eval/inception.py`; `--inception_weights` may
be left out when $FID_INCEPTION_WEIGHTS names it. `--save_reference ref_stats.npz` writes the
reference's statistics and activations, which later runs can pass as the reference instead.
"""
from __future__ import annotations

import argparse
import os
import time

from switch_dit_jax import cli
from switch_dit_jax.eval import load_network, metrics


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser("switch_dit_jax.eval", __doc__)
    p.add_argument("samples", help="sample batch .npz (arr_0: uint8 NHWC images)")
    p.add_argument("reference", help="reference batch .npz (ADM format)")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    p.add_argument("--inception_weights", default=os.environ.get("FID_INCEPTION_WEIGHTS"),
                   help="FID Inception weights .npz (default: $FID_INCEPTION_WEIGHTS)")
    p.add_argument("--batch_size", type=int, default=200,
                   help="images per step, split over all devices")
    p.add_argument("--save_reference", default=None,
                   help="also write the reference statistics and activations here")
    return cli.parse(p, argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.inception_weights:
        raise SystemExit("no Inception weights: pass --inception_weights PATH.npz or set "
                         "$FID_INCEPTION_WEIGHTS (see switch_dit_jax/eval/inception.py).")
    for path in (args.samples, args.reference):
        if not os.path.isfile(path):
            raise SystemExit(f"{path!r} does not exist; pass an ADM-format .npz.")
    start = time.time()
    network = load_network(args.inception_weights)
    reference = metrics.load_reference(args.reference, network, args.batch_size)
    if args.save_reference:
        metrics.save_reference(args.save_reference, reference)
    samples = metrics.NpzImages(args.samples)
    features = network.features(samples, args.batch_size)
    result = metrics.image_metrics(features, reference)
    result.update(num_samples=len(samples), samples=args.samples, reference=args.reference,
                  seconds=round(time.time() - start, 1))
    cli.report_json(result, args.out)
    return result


if __name__ == "__main__":
    cli.run(main)
