"""Captions as training data: the caption block of a latent record, the null caption, the
text encoder at `config.text.encoder_dir`, and `data.name="digits_text"` (the T2I quickstart).

Caption block (appended to an SDL1 latent record, see `sources`; little-endian):

    bytes 0..3    magic b"TXT1"
    bytes 4..15   int32[3]: K captions, L tokens, D width
    then          float16[K, L, D] text-encoder hidden states (C-order)
    then          uint8[K, L] token mask (1 on BOS..EOS, 0 on padding)

A text data directory also holds `empty_caption.npz` (`text` float32 [L, D], `text_mask`
bool [L]): the encoding of "" by the same encoder, the null condition of classifier-free
guidance. Any object with `.encode(texts) -> (hidden [B, L, D], mask [B, L])`, `.width` and
`.max_length` can stand in for the CLIP encoder (tests pass a fake one).
"""
from __future__ import annotations

import functools
import os
import struct

import numpy as np

CAPTION_MAGIC = b"TXT1"
_BLOCK_HEADER = struct.Struct("<4s3i")
EMPTY_CAPTION = "empty_caption.npz"
TINY_HINT = ("write a tiny one with `python -m switch_dit_jax.text.tiny --out=DIR` (or point it "
             "at a Hugging Face CLIP directory)")

# digits_text: five captions per class. Every word must be in the tiny CLIP's vocabulary
# (switch_dit_jax.text.tiny.DIGIT_WORDS), or the tokenizer would map it to [UNK].
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a handwritten {name}", "the digit {digit}", "a handwritten digit {name}",
                   "the number {digit}", "a picture of the number {name}")
DIGIT_TEXT_WORDS = ("a", "handwritten", "the", "digit", "number", "picture", "of",
                    *DIGIT_NAMES, *(str(d) for d in range(10)))


def digit_captions(label: int) -> list[str]:
    return [t.format(name=DIGIT_NAMES[label], digit=label) for t in DIGIT_TEMPLATES]


def prompt_digits(prompts) -> np.ndarray:
    """The digit each prompt asks for ("the number 7", "a handwritten seven" -> 7): the labels
    that the digits classifier checks text-to-image samples against; -1 where none is named."""
    names = {name: d for d, name in enumerate(DIGIT_NAMES)} | {str(d): d for d in range(10)}
    out = []
    for prompt in prompts:
        hits = {names[w] for w in str(prompt).lower().replace(",", " ").split() if w in names}
        out.append(hits.pop() if len(hits) == 1 else -1)
    return np.asarray(out, np.int32)


# ----------------------------------------------------------------------------- caption block


def encode_caption_block(captions, caption_mask) -> bytes:
    captions = np.asarray(captions, dtype="<f2")
    mask = np.asarray(caption_mask)
    if captions.ndim != 3 or mask.shape != captions.shape[:2]:
        raise ValueError(f"captions must be [K, L, D] with a [K, L] mask; got {captions.shape} "
                         f"and {mask.shape}.")
    k, length, width = captions.shape
    return (_BLOCK_HEADER.pack(CAPTION_MAGIC, k, length, width)
            + np.ascontiguousarray(captions).tobytes()
            + np.ascontiguousarray(mask, dtype=np.uint8).tobytes())


def decode_caption_block(record: bytes, offset: int) -> dict:
    """{"captions": float16 [K, L, D], "caption_mask": bool [K, L]} from `record[offset:]`."""
    if len(record) - offset < _BLOCK_HEADER.size or \
            record[offset:offset + 4] != CAPTION_MAGIC:
        raise ValueError(f"record has {len(record) - offset} bytes after its latents where a "
                         f"{CAPTION_MAGIC!r} caption block or nothing belongs: the record is "
                         "damaged")
    _, k, length, width = _BLOCK_HEADER.unpack_from(record, offset)
    start = offset + _BLOCK_HEADER.size
    n = k * length * width
    if min(k, length, width) < 1 or len(record) != start + 2 * n + k * length:
        raise ValueError(f"record's caption block announces float16 captions of shape "
                         f"({k}, {length}, {width}) but holds {len(record) - start} bytes: the "
                         "record is damaged")
    captions = np.frombuffer(record, "<f2", n, start).reshape(k, length, width)
    mask = np.frombuffer(record, np.uint8, k * length, start + 2 * n).reshape(k, length)
    return {"captions": captions, "caption_mask": mask.astype(bool)}


# ----------------------------------------------------------------------------- encoder


def check_encoder_dir(encoder_dir, flag: str = "config.text.encoder_dir") -> str:
    if not encoder_dir:
        raise ValueError(f"{flag} is empty but text conditioning needs a CLIP text encoder; "
                         f"{TINY_HINT} and set {flag}=DIR.")
    if not os.path.isdir(encoder_dir):
        raise FileNotFoundError(f"{flag}={encoder_dir!r} is not a directory; {TINY_HINT} and "
                                f"set {flag}=DIR.")
    return os.path.abspath(encoder_dir)


@functools.lru_cache(maxsize=2)
def _cached_encoder(path: str):
    from switch_dit_jax.text import load_text_encoder  # lazy: the CLIP network loads weights
    return load_text_encoder(path)


def load_encoder(encoder_dir, flag: str = "config.text.encoder_dir"):
    """The text encoder of a CLIP directory, loaded once per process."""
    return _cached_encoder(check_encoder_dir(encoder_dir, flag))


def encode_texts(encoder, texts) -> tuple[np.ndarray, np.ndarray]:
    """(hidden float32 [B, L, D], mask bool [B, L]) as host arrays, shape-checked."""
    hidden, mask = encoder.encode(list(texts))
    hidden, mask = np.asarray(hidden, np.float32), np.asarray(mask, bool)
    expect = (len(texts), encoder.max_length, encoder.width)
    if hidden.shape != expect or mask.shape != expect[:2]:
        raise ValueError(f"the text encoder returned hidden states {hidden.shape} and mask "
                         f"{mask.shape}, not {expect} and {expect[:2]}; it is not a CLIP-style "
                         "encoder of the contract.")
    return hidden, mask


def empty_caption(encoder) -> tuple[np.ndarray, np.ndarray]:
    hidden, mask = encode_texts(encoder, [""])
    return hidden[0], mask[0]


def write_empty_caption(out_dir: str, encoder) -> str:
    text, text_mask = empty_caption(encoder)
    path = os.path.join(out_dir, EMPTY_CAPTION)
    tmp = f"{path}.{os.getpid()}.tmp.npz"  # hosts may write it at once; each its own name
    np.savez(tmp, text=text, text_mask=text_mask)
    os.replace(tmp, path)
    return path


def load_empty_caption(data_config, text_encoder_dir=None,
                       encoder=None) -> tuple[np.ndarray, np.ndarray]:
    """The null condition `(text float32 [L, D], text_mask bool [L])` of a text dataset.

    COCO latents: `empty_caption.npz` of `data.dir`. digits_text: "" encoded by `encoder`, or
    by the encoder at `text_encoder_dir` (config.text.encoder_dir). A whole config (with
    `.data` and `.text`) may be passed instead of its data section.
    """
    from switch_dit_jax.data.sources import _field  # sources imports this module
    if _field(data_config, "data") is not None:
        text_encoder_dir = text_encoder_dir or _field(_field(data_config, "text", {}),
                                                      "encoder_dir")
        data_config = _field(data_config, "data")
    name = _field(data_config, "name")
    if name == "digits_text":
        return empty_caption(encoder or load_encoder(text_encoder_dir))
    if name != "latents":
        raise ValueError(f"data.name={name!r} has no captions; the empty caption exists for "
                         "data.name='latents' (captioned COCO records) or 'digits_text'.")
    from switch_dit_jax import files
    data_dir = _field(data_config, "dir")
    path = os.path.join(data_dir or "", EMPTY_CAPTION)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.dir={data_dir!r} has no {EMPTY_CAPTION}; it holds no "
                                "captioned latents, so extract them with `python -m "
                                "switch_dit_jax.data.extract --source=coco ...`.")
    arrays = files.load_npz(path, "empty caption file", keys=("text", "text_mask"))
    if len(arrays) != 2:
        raise ValueError(f"{path!r} lacks the 'text' or 'text_mask' array; re-run the "
                         "extraction to rewrite it.")
    text, mask = arrays["text"].astype(np.float32), arrays["text_mask"].astype(bool)
    if text.ndim != 2 or mask.shape != text.shape[:1]:
        raise ValueError(f"{path!r} holds text {text.shape} and text_mask {mask.shape}, not "
                         "[L, D] and [L]; re-run the extraction to rewrite it.")
    return text, mask


# ----------------------------------------------------------------------------- digits_text


class DigitsTextSource:
    """The 8x8 digits, each with the five captions of its class (encoded once, not per image).

    Yields {"image", "label", "captions" [5, L, D] float32, "caption_mask" [5, L]}; the loader
    draws one caption per record with its seeded rng.
    """

    image_shape = (8, 8, 1)
    num_classes = 10

    def __init__(self, text_encoder_dir=None, encoder=None):
        from switch_dit_jax.data.sources import DigitsSource
        encoder = encoder or load_encoder(text_encoder_dir)
        self._digits = DigitsSource()
        self.texts = [digit_captions(label) for label in range(10)]
        hidden, mask = encode_texts(encoder, [t for texts in self.texts for t in texts])
        k = len(DIGIT_TEMPLATES)
        self._captions = hidden.reshape(10, k, *hidden.shape[1:])
        self._mask = mask.reshape(10, k, -1)
        self.text_shape = tuple(hidden.shape[1:])

    def __len__(self) -> int:
        return len(self._digits)

    def __getitem__(self, index: int) -> dict:
        rec = self._digits[index]
        label = int(rec["label"])
        return dict(rec, captions=self._captions[label], caption_mask=self._mask[label])

    def __repr__(self) -> str:
        # Shapes, not the encoder's path, so a checkpoint survives moving the encoder.
        return (f"DigitsTextSource(templates={len(DIGIT_TEMPLATES)}, "
                f"text_shape={self.text_shape})")
