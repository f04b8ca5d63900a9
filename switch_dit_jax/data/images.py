"""Source images for the shard writers: ADM's centre crop, image folders, and the readers
(index -> uint8 RGB crop, label) that `extract.py` (latents) and `pixels.py` (uint8) share.

The grain data sources that training reads live in `sources.py`; this module is what the
offline writers read, so a latent and a pixel shard of the same image start from the same
bytes.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

# What the manifests say of the crop below.
CROP = "ADM center_crop_arr: BOX-halve while >= 2x, BICUBIC to short side, centre crop"


def center_crop_arr(image, image_size: int) -> np.ndarray:
    """ADM's centre crop: BOX-halve while possible, BICUBIC to min side == size, crop centre."""
    pil = image
    if not isinstance(pil, Image.Image):
        arr = np.asarray(image)
        pil = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    # Halving with BOX before the final BICUBIC avoids aliasing on large downscales.
    while min(*pil.size) >= 2 * image_size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = image_size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.array(pil)
    if arr.ndim == 2:
        arr = arr[..., None]
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
FOLDER_LABELS = ("auto", "subfolders", "none")


def _image_files(root: str) -> list[str]:
    """Image files under `root`, recursively, in a sorted (hence reproducible) order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    return found


class ImageFolder:
    """Image files of a directory, for the latent and pixel writers (ImageNet `train/`, FFHQ).

    labels="subfolders": each subfolder of `image_dir` is a class, labelled by its position in
    the sorted folder names (ImageNet synsets sort to the standard 0..999 labels); files are
    found recursively inside. labels="none": every image found recursively is label 0 of one
    class (unconditional; FFHQ ships in numbered subfolders that are not classes).
    labels="auto": "subfolders" when image_dir holds folders, "none" when it holds only images.
    """

    def __init__(self, image_dir: str, labels: str = "auto"):
        if not image_dir or not os.path.isdir(image_dir):
            raise FileNotFoundError(f"--image_dir={image_dir!r} is not a directory; pass the "
                                    "folder holding the images (or their class subfolders).")
        if labels not in FOLDER_LABELS:
            raise ValueError(f"--labels={labels!r} is not one of {list(FOLDER_LABELS)}.")
        entries = sorted(e for e in os.listdir(image_dir) if not e.startswith("."))
        subdirs = [e for e in entries if os.path.isdir(os.path.join(image_dir, e))]
        top_images = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)]
        if labels == "auto":
            if subdirs and top_images:
                raise ValueError(f"--image_dir={image_dir!r} holds both image files and "
                                 "subfolders; pass --labels=subfolders (classes) or --labels=none "
                                 "(one class).")
            labels = "subfolders" if subdirs else "none"
        if labels == "subfolders":
            if not subdirs:
                raise ValueError(f"--image_dir={image_dir!r} has no class subfolders; pass "
                                 "--labels=none for a flat folder of unlabelled images.")
            self.class_names = subdirs
            self.paths, self.labels = [], []
            for label, name in enumerate(subdirs):
                files = _image_files(os.path.join(image_dir, name))
                self.paths.extend(files)
                self.labels.extend([label] * len(files))
        else:
            self.class_names = []
            self.paths = _image_files(image_dir)
            self.labels = [0] * len(self.paths)
        if not self.paths:
            raise FileNotFoundError(f"--image_dir={image_dir!r} contains no image files "
                                    f"({', '.join(IMAGE_EXTENSIONS)}).")
        self.image_dir = image_dir
        self.labelling = labels
        self.num_classes = max(len(self.class_names), 1)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """The RGB image at `index`; raises (OSError, ...) for an unreadable file."""
        with Image.open(self.paths[index]) as img:
            return img.convert("RGB")

    def __repr__(self) -> str:
        return (f"ImageFolder(image_dir={self.image_dir!r}, labels={self.labelling!r}, "
                f"num_images={len(self)})")


# ----------------------------------------------------------------------------- readers


def _rgb(image: np.ndarray) -> np.ndarray:
    return image[..., :3] if image.shape[-1] >= 3 else np.repeat(image, 3, axis=-1)


class FolderReader:
    """An image folder through the centre crop; `description` and `label_map` go into the
    writers' manifests."""

    def __init__(self, image_dir: str, labels: str, image_size: int):
        self.folder = ImageFolder(image_dir, labels)
        self.size = image_size
        self.num_classes = self.folder.num_classes
        self.label_map = {name: i for i, name in enumerate(self.folder.class_names)}
        self.description = {"kind": "folder", "image_dir": os.path.abspath(image_dir),
                            "labels": self.folder.labelling}

    def __len__(self):
        return len(self.folder)

    def name(self, index: int) -> str:
        return self.folder.paths[index]

    def load(self, index: int):
        return center_crop_arr(self.folder.load(index), self.size), self.folder.labels[index]


class TfdsReader:
    """A prepared TFDS split (see `sources.TfdsSource`) through the centre crop."""

    def __init__(self, tfds_name: str, data_dir: str | None, split: str, image_size: int):
        from switch_dit_jax.data.sources import TfdsSource  # sources imports this module
        self.source = TfdsSource(tfds_name, data_dir, split, image_size)
        self.num_classes = self.source.num_classes or 1
        import tensorflow_datasets as tfds  # lazy: heavy; TfdsSource has checked it is prepared
        names = getattr(tfds.builder(tfds_name, data_dir=data_dir).info.features["label"],
                        "names", None) or []
        self.label_map = {n: i for i, n in enumerate(names)}
        self.description = {"kind": "tfds", "name": tfds_name, "split": split,
                            "data_dir": os.path.abspath(data_dir) if data_dir else None}
        self._tag = f"tfds:{tfds_name}/{split}"

    def __len__(self):
        return len(self.source)

    def name(self, index: int) -> str:
        return f"{self._tag}[{index}]"

    def load(self, index: int):
        image, label = self.source.crop(index)
        return _rgb(image), label


def make_reader(source: str, *, image_dir=None, labels="auto", tfds_name=None, data_dir=None,
                split="train", image_size: int = 256):
    """The reader of --source=folder or tfds (extract's coco reader lives in `coco.py`)."""
    if source == "folder":
        return FolderReader(image_dir, labels, image_size)
    if source == "tfds":
        if not tfds_name:
            raise ValueError("--tfds_name is empty; name the TFDS dataset, e.g. imagenet2012.")
        return TfdsReader(tfds_name, data_dir or None, split, image_size)
    raise ValueError(f"--source={source!r}; use 'folder' or 'tfds'.")
