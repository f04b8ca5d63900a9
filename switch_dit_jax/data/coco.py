"""MS-COCO captions: the annotation JSON, the reader behind `extract --source=coco`, and the
validation set for text-to-image evaluation.

    python -m switch_dit_jax.data.coco --image_dir=/data/coco/val2014 \
        --annotations=/data/coco/annotations/captions_val2014.json \
        --text_encoder=/weights/clip-vit-large-patch14 --out_dir=/data/coco256_val

writes, for the first `--num` captioned validation images by image id (default: DTR's 50K
samples, i.e. all 40,504 of val2014), one caption each (the one with the lowest annotation id):
  * `val_captions.npz`: `text` float16 [N, L, D] and `text_mask` bool [N, L] (the encoder's
    output), `captions` (str [N]), `image_ids` (int64 [N]), `empty_text` float32 [L, D] and
    `empty_text_mask` bool [L] (the null caption);
  * `val_prompts.txt`: the same captions, one a line (for `config.sample.prompts`);
  * `val_reference_<size>.npz`: the images through ADM's `center_crop_arr`, an ADM-format
    reference batch (`arr_0` uint8 [N, size, size, 3]) that `switch_dit_jax.eval` reads.
"""
from __future__ import annotations

import json
import logging
import os
import zipfile

import numpy as np
from PIL import Image

from switch_dit_jax import cli
from switch_dit_jax.data import captions as captions_lib
from switch_dit_jax.data.images import center_crop_arr
from switch_dit_jax.vae import sha256_file

log = logging.getLogger("switch_dit_jax")

CAPTIONS_PER_IMAGE = 5  # COCO annotates every image with five (a few have six or seven)
DTR_EVAL_SAMPLES = 50_000  # DTR Appendix C: MS-COCO "evaluated model performance on 50K samples"
VAL_CAPTIONS = "val_captions.npz"
VAL_PROMPTS = "val_prompts.txt"


def read_annotations(annotations: str, image_dir: str):
    """([(image_id, path, captions ordered by annotation id)] by image id, #images uncaptioned).

    Every captioned image must exist in `image_dir`: a missing one is an error, not a skip, as
    it means the wrong folder (train2014 vs val2014) or an incomplete download.
    """
    if not annotations or not os.path.isfile(annotations):
        raise FileNotFoundError(f"--annotations={annotations!r} is not a file; pass COCO's "
                                "captions_train2014.json (or captions_val2014.json).")
    if not image_dir or not os.path.isdir(image_dir):
        raise FileNotFoundError(f"--image_dir={image_dir!r} is not a directory; pass the COCO "
                                "image folder (e.g. train2014/) that --annotations describes.")
    try:
        with open(annotations, encoding="utf-8") as f:
            data = json.load(f)
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        anns = sorted((int(a["id"]), int(a["image_id"]), str(a["caption"]))
                      for a in data["annotations"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--annotations={annotations!r} is not valid JSON ({e}); download "
                         "the COCO caption annotations again.") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--annotations={annotations!r} is not a COCO caption file "
                         f"({type(e).__name__}: {e}); it needs images [{{id, file_name}}] and "
                         "annotations [{id, image_id, caption}].") from None
    by_image: dict[int, list[str]] = {}
    for _, image_id, caption in anns:
        if image_id not in files:
            raise ValueError(f"--annotations={annotations!r} has a caption for image_id="
                             f"{image_id}, which its images list lacks; the file is damaged, "
                             "so download it again.")
        by_image.setdefault(image_id, []).append(" ".join(caption.split()))
    entries = []
    for image_id in sorted(by_image):
        path = os.path.join(image_dir, files[image_id])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image_id={image_id} of --annotations={annotations!r} has "
                                    f"no file {path!r}; pass the --image_dir that matches the "
                                    "annotations (train2014 for captions_train2014.json).")
        entries.append((image_id, path, by_image[image_id]))
    if not entries:
        raise ValueError(f"--annotations={annotations!r} holds no captions; pass a COCO "
                         "captions_*.json, not instances_*.json.")
    return entries, len(files) - len(entries)


def pick_captions(captions: list[str], k: int) -> list[str]:
    """The first k captions, repeated cyclically when an image has fewer."""
    return [captions[i % len(captions)] for i in range(k)]


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")  # COCO holds some greyscale JPEGs


class CocoReader:
    """Captioned COCO images for `extract`: uint8 centre crops (as `images.FolderReader`) and
    K captions."""

    def __init__(self, image_dir: str, annotations: str, image_size: int,
                 captions_per_image: int = CAPTIONS_PER_IMAGE):
        if not isinstance(captions_per_image, int) or captions_per_image < 1:
            raise ValueError(f"--captions_per_image={captions_per_image!r} must be a positive "
                             "integer (5 for COCO).")
        self.entries, self.num_uncaptioned = read_annotations(annotations, image_dir)
        self.size, self.k = image_size, captions_per_image
        self.num_classes, self.label_map = 0, {}
        self.description = {"kind": "coco", "image_dir": os.path.abspath(image_dir),
                            "annotations": os.path.abspath(annotations),
                            "annotations_size": os.path.getsize(annotations)}
        if self.num_uncaptioned:
            log.info("%d images of %s have no caption and are skipped", self.num_uncaptioned,
                     annotations)

    def __len__(self):
        return len(self.entries)

    def name(self, index: int) -> str:
        return self.entries[index][1]

    def load(self, index: int):
        return center_crop_arr(load_rgb(self.entries[index][1]), self.size), 0

    def captions(self, index: int) -> list[str]:
        return pick_captions(self.entries[index][2], self.k)

    def encode_captions(self, encoder, indices):
        """float16 [b, K, L, D] caption embeddings and bool [b, K, L] masks of `indices`."""
        texts = [t for i in indices for t in self.captions(i)]
        hidden, mask = captions_lib.encode_texts(encoder, texts)
        b = len(indices)
        return (hidden.astype(np.float16).reshape(b, self.k, *hidden.shape[1:]),
                mask.reshape(b, self.k, -1))

    def text_manifest(self, encoder, text_encoder: str | None) -> dict:
        """The manifest's text fields; the encoder's weight hash makes a resume check it."""
        weights = os.path.join(text_encoder or "", "model.safetensors")
        return {"conditioning": "text", "text_width": int(encoder.width),
                "text_length": int(encoder.max_length), "captions_per_image": self.k,
                "text_encoder": (os.path.abspath(text_encoder) if text_encoder
                                 else repr(encoder)),
                "text_encoder_sha256": (sha256_file(weights) if os.path.isfile(weights)
                                        else None),
                "num_uncaptioned": self.num_uncaptioned,
                "captions": "float16 [K, L, D] encoder hidden states and a bool [K, L] token "
                            "mask per record (both records of an image); training draws one"}


# ----------------------------------------------------------------------------- validation set


def _write_npy_rows(zf: zipfile.ZipFile, key: str, shape, dtype, rows) -> None:
    """Streams an array into an .npz member row block by row block (no [N, ...] in memory)."""
    with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                  "fortran_order": False, "shape": tuple(shape)}
        np.lib.format.write_array_header_2_0(f, header)
        for block in rows:
            f.write(np.ascontiguousarray(block, dtype=dtype).tobytes())


def write_val_set(*, image_dir: str, annotations: str, out_dir: str, text_encoder=None,
                  encoder=None, num: int = DTR_EVAL_SAMPLES, image_size: int = 256,
                  batch_size: int = 64) -> dict:
    """Writes the validation captions, prompts and reference batch (module doc); returns paths."""
    for flag, value in (("num", num), ("image_size", image_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"--{flag}={value!r} must be a positive integer.")
    if not out_dir:
        raise ValueError("--out_dir is empty; pass the directory for the validation files.")
    entries, uncaptioned = read_annotations(annotations, image_dir)
    if num > len(entries):
        log.info("--num=%d exceeds the %d captioned validation images; using all of them",
                 num, len(entries))
    entries = entries[:num]
    n = len(entries)
    encoder = encoder or captions_lib.load_encoder(text_encoder, "--text_encoder")
    texts = [caps[0] for _, _, caps in entries]
    os.makedirs(out_dir, exist_ok=True)
    empty_text, empty_mask = captions_lib.empty_caption(encoder)
    paths = {"captions": os.path.join(out_dir, VAL_CAPTIONS),
             "prompts": os.path.join(out_dir, VAL_PROMPTS),
             "reference": os.path.join(out_dir, f"val_reference_{image_size}.npz")}
    masks = []

    def hidden_blocks():
        for start in range(0, n, batch_size):
            h, m = captions_lib.encode_texts(encoder, texts[start:start + batch_size])
            masks.append(m)
            yield h

    # Streamed like the reference batch: 40K captions of CLIP-L are ~5 GB in float16.
    tmp = paths["captions"] + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_npy_rows(zf, "text", (n, encoder.max_length, encoder.width), np.float16,
                        hidden_blocks())
        small = {"text_mask": np.concatenate(masks), "captions": np.asarray(texts, dtype=str),
                 "image_ids": np.asarray([e[0] for e in entries], np.int64),
                 "empty_text": empty_text, "empty_text_mask": empty_mask}
        for key, value in small.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, value, allow_pickle=False)
    os.replace(tmp, paths["captions"])
    with open(paths["prompts"], "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in texts)

    def crops():
        for i, (_, path, _) in enumerate(entries):
            yield center_crop_arr(load_rgb(path), image_size)[None]
            if (i + 1) % 5000 == 0:
                log.info("reference batch: %d/%d images", i + 1, n)

    tmp = paths["reference"] + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_npy_rows(zf, "arr_0", (n, image_size, image_size, 3), np.uint8, crops())
    os.replace(tmp, paths["reference"])
    log.info("wrote %d validation captions (%d images without one skipped) and the reference "
             "batch to %s", n, uncaptioned, out_dir)
    return dict(paths, num=n)


def main(argv=None) -> dict:
    p = cli.parser("switch_dit_jax.data.coco", __doc__)
    p.add_argument("--image_dir", required=True, help="COCO val2014/ (or val2017/)")
    p.add_argument("--annotations", required=True, help="captions_val2014.json")
    p.add_argument("--text_encoder", required=True, help="Hugging Face CLIP directory")
    p.add_argument("--out_dir", required=True, help="where the three files go")
    p.add_argument("--num", type=int, default=DTR_EVAL_SAMPLES,
                   help="images (and captions); default DTR's 50K, capped at what exists")
    p.add_argument("--image_size", type=int, default=256, help="reference crop size")
    p.add_argument("--batch_size", type=int, default=64, help="captions per encoder call")
    return write_val_set(**vars(cli.parse(p, argv)))


if __name__ == "__main__":
    cli.run(main, (ValueError, OSError))
