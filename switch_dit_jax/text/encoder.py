"""The text encoder of the T2I models: captions -> CLIP hidden states and padding mask.

    encoder = load_text_encoder("/path/clip-vit-large-patch14")
    hidden, mask = encoder.encode(["a photo of a cat"])   # [1, 77, 768] float32, [1, 77] bool
"""
from __future__ import annotations

import jax
import numpy as np

from switch_dit_jax.errors import UserError
from switch_dit_jax.text.clip import TextTransformer
from switch_dit_jax.text.config import TextConfig, read_config
from switch_dit_jax.text.tokenizer import ClipTokenizer
from switch_dit_jax.text.weights import load_text_params


def batches(n: int, batch_size: int):
    """(start, stop, rows) chunks of range(n): full chunks of batch_size, then the rest padded
    to a power of two, so that a jitted forward compiles for only a few batch shapes."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size={batch_size!r} must be a positive integer, e.g. 64.")
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield start, stop, min(batch_size, 1 << (stop - start - 1).bit_length())


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """x with its last row repeated up to `rows` rows (real data, so no NaN or overflow)."""
    return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)]) if rows > len(x) else x


class TextEncoder:
    """A CLIP text tower with its tokenizer; `width` (D) and `max_length` (L) describe it."""

    def __init__(self, config: TextConfig, params, tokenizer: ClipTokenizer):
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.width, self.max_length = config.tower.width, config.max_length
        module = TextTransformer(config)
        self._forward = jax.jit(lambda p, ids: module.apply({"params": p}, ids))

    def check_ids(self, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids)
        c = self.config
        if ids.dtype.kind not in "iu" or ids.ndim != 2 or not 1 <= ids.shape[1] <= c.max_length:
            raise UserError(f"input_ids must be integers of shape [batch, length] with length "
                            f"at most {c.max_length}, got {ids.dtype} {ids.shape}; tokenise "
                            "with encoder.tokenize(texts).")
        if ids.size and not (0 <= ids.min() and ids.max() < c.vocab_size):
            raise UserError(f"input_ids holds {int(ids.min())}..{int(ids.max())}, outside this "
                            f"CLIP's vocabulary [0, {c.vocab_size}); tokenise with this model's "
                            "own tokenizer.json.")
        return ids.astype(np.int32)

    def encode_ids(self, input_ids) -> jax.Array:
        """Hugging Face `CLIPTextModel(input_ids).last_hidden_state`, float32 [B, L, D]."""
        return self._forward(self.params, self.check_ids(input_ids))

    def tokenize(self, texts) -> tuple[np.ndarray, np.ndarray]:
        return self.tokenizer.tokenize(texts)

    def encode(self, texts, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(hidden float32 [B, L, D], mask bool [B, L]) of a list of captions."""
        ids, mask = self.tokenize(texts)
        hidden = np.zeros((len(ids), self.max_length, self.width), np.float32)
        for start, stop, rows in batches(len(ids), batch_size):
            out = self._forward(self.params, pad_rows(ids[start:stop], rows))
            hidden[start:stop] = np.asarray(out)[: stop - start]
        return hidden, mask


def load_text_encoder(model_dir: str) -> TextEncoder:
    """The text encoder of a Hugging Face CLIP or CLIPTextModel directory (config.json,
    model.safetensors, tokenizer.json; tokenizer_config.json optional)."""
    config = read_config(model_dir)
    tokenizer = ClipTokenizer(model_dir, config.text.max_length)
    return TextEncoder(config.text, load_text_params(model_dir, config), tokenizer)
