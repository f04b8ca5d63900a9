"""The CLIP score of images against their prompts, as torchmetrics' `CLIPScore` defines it:
the mean over samples of 100 * max(cos(image_embeds, text_embeds), 0).

    score = clip_score(images_uint8, prompts, "/path/clip-vit-large-patch14")

Images are prepared as transformers' `CLIPImageProcessor` does: the shorter side resized to
the model's image size (PIL bicubic, on uint8), a centre crop, [0, 1], then OpenAI's mean/std.
The text embedding is pooled at the EOS token, so it does not depend on padding (the text
tower is causal) and matches torchmetrics' longest-padding with an attention mask.
"""
from __future__ import annotations

import jax
import numpy as np

from switch_dit_jax.errors import BadFileError, UserError
from switch_dit_jax.text.clip import ClipModel
from switch_dit_jax.text.config import ClipConfig, read_config
from switch_dit_jax.text.encoder import batches, pad_rows
from switch_dit_jax.text.tokenizer import ClipTokenizer
from switch_dit_jax.text.weights import load_clip_params

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def preprocess(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> normalised float32 [N, size, size, 3]."""
    from PIL import Image
    out = np.zeros((len(images), size, size, 3), np.float32)
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        short, long = min(h, w), max(h, w)
        long = int(size * long / short)  # transformers' rounding of the longer side
        new_h, new_w = (size, long) if h <= w else (long, size)
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        crop = resized[top:top + size, left:left + size].astype(np.float32) / 255.0
        out[i] = (crop - MEAN) / STD
    return out


class Clip:
    """Both towers of a CLIP directory; `image_embeds`, `text_embeds` and `scores`."""

    def __init__(self, config: ClipConfig, params, tokenizer: ClipTokenizer):
        self.config, self.params, self.tokenizer = config, params, tokenizer
        module = ClipModel(config)
        self._text = jax.jit(lambda p, ids: module.apply({"params": p}, ids,
                                                         method="text_embeds"))
        self._image = jax.jit(lambda p, x: module.apply({"params": p}, x,
                                                        method="image_embeds"))

    def _run(self, forward, x: np.ndarray, batch_size: int) -> np.ndarray:
        out = np.zeros((len(x), self.config.projection_dim), np.float32)
        for start, stop, rows in batches(len(x), batch_size):
            out[start:stop] = np.asarray(forward(self.params, pad_rows(x[start:stop], rows))
                                         )[: stop - start]
        return out

    def image_embeds(self, images, batch_size: int = 64) -> np.ndarray:
        """`CLIPModel.get_image_features` of uint8 images [N, H, W, 3]."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 \
                or 0 in images.shape:
            raise UserError(f"images must be uint8 [N, H, W, 3] RGB, got {images.dtype} "
                            f"{images.shape}; convert samples with np.uint8 first.")
        pixels = preprocess(images, self.config.vision.image_size)
        return self._run(self._image, pixels, batch_size)

    def text_embeds(self, texts, batch_size: int = 64) -> np.ndarray:
        """`CLIPModel.get_text_features` of captions (truncated to max_length tokens)."""
        ids, _ = self.tokenizer.tokenize(texts)
        return self._run(self._text, ids, batch_size)

    def scores(self, images, texts, batch_size: int = 64) -> np.ndarray:
        """Per-sample 100 * max(cos, 0), float64 [N]."""
        if len(images) != len(texts):
            raise UserError(f"clip score got {len(images)} images but {len(texts)} texts; pass "
                            "one prompt per image.")
        a = self.image_embeds(images, batch_size).astype(np.float64)
        b = self.text_embeds(texts, batch_size).astype(np.float64)
        cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        return 100.0 * np.maximum(cos, 0.0)


def load_clip(model_dir: str) -> Clip:
    """Both towers of a full Hugging Face CLIPModel directory."""
    config = read_config(model_dir)
    if config.vision is None:
        raise BadFileError(f"{model_dir!r} holds a CLIPTextModel, but the CLIP score needs the "
                           "vision tower too; pass a full CLIP directory such as "
                           "openai/clip-vit-large-patch14.")
    return Clip(config, load_clip_params(model_dir, config),
                ClipTokenizer(model_dir, config.text.max_length))


def clip_scores(images, texts, model_dir, batch_size: int = 64) -> np.ndarray:
    """Per-sample CLIP scores [N]; `model_dir` may be a directory or a loaded `Clip`."""
    clip = model_dir if isinstance(model_dir, Clip) else load_clip(model_dir)
    return clip.scores(images, texts, batch_size)


def clip_score(images, texts, model_dir, batch_size: int = 64) -> float:
    """The mean of `clip_scores` (torchmetrics' CLIPScore)."""
    return float(np.mean(clip_scores(images, texts, model_dir, batch_size)))
