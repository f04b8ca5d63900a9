"""Captions -> CLIP token ids with the Hugging Face `tokenizers` library, from a local
`tokenizer.json` (nothing is downloaded at run time).

Sequences are padded to `max_length` with the pad token, as Stable Diffusion and the DiT-T2I
pipelines encode (`padding="max_length"`), and a longer caption is cut so that its last token
(the EOS the post-processor adds) stays last, as transformers' truncation does. The special
tokens come from `tokenizer_config.json` / `special_tokens_map.json` where present; OpenAI's
CLIP pads with its EOS, `<|endoftext|>`, which is also the default.
"""
from __future__ import annotations

import os

import numpy as np

from switch_dit_jax.errors import BadFileError, UserError
from switch_dit_jax.text.config import model_file, read_json

DEFAULT_EOS = "<|endoftext|>"


def _token(fields: dict, name: str):
    value = fields.get(name)
    return value.get("content") if isinstance(value, dict) else value


def special_tokens(model_dir: str) -> dict[str, str]:
    """{"eos": ..., "pad": ...}: tokenizer_config.json wins over special_tokens_map.json."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(os.fspath(model_dir), name)
        if os.path.isfile(path):
            fields = read_json(path)
            for role in ("eos", "pad"):
                token = _token(fields, f"{role}_token")
                if isinstance(token, str) and token:
                    found[role] = token
    eos = found.get("eos", DEFAULT_EOS)
    return {"eos": eos, "pad": found.get("pad", eos)}


def tokenizers_module():
    """The `tokenizers` package, imported only when needed (the GPU image may lack it)."""
    try:
        import tokenizers
    except ImportError:
        raise UserError("CLIP tokenising needs the Hugging Face `tokenizers` package, which "
                        "is not installed; run `pip install tokenizers`.") from None
    return tokenizers


class ClipTokenizer:
    """`tokenize(texts) -> (ids int32 [B, L], mask bool [B, L])`, mask True on BOS..EOS."""

    def __init__(self, model_dir: str, max_length: int):
        path = model_file(model_dir, "tokenizer.json")
        Tokenizer = tokenizers_module().Tokenizer
        try:
            self._tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise BadFileError(f"tokenizer file {path!r} cannot be read ({e}); download it "
                               "again.") from None
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.max_length = max_length
        tokens = special_tokens(model_dir)
        self.pad_id = self._id(tokens["pad"], path)

    def _id(self, token: str, path: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise BadFileError(f"tokenizer file {path!r} has no token {token!r}, which its "
                               "tokenizer_config.json names as a special token; download the "
                               "tokenizer files of one model together.")
        return token_id

    def tokenize(self, texts) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise UserError(f"texts must be a list of strings, got {type(texts).__name__} "
                            f"{str(texts)[:40]!r}; wrap a single caption as [caption].")
        n, length = len(texts), self.max_length
        ids = np.full((n, length), self.pad_id, np.int32)
        mask = np.zeros((n, length), bool)
        for i, encoding in enumerate(self._tokenizer.encode_batch(list(texts))):
            row = encoding.ids
            if len(row) > length:  # keep the closing token, drop the caption's tail
                row = row[: length - 1] + row[-1:]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = True
        return ids, mask
