"""A stand-in for the CLIP text encoder with the contract's interface and a closed form.

Token t at position p encodes to u(t) + p/100 where u(t) is a fixed random vector seeded by
the token's crc32; tokens are [BOS], the lower-cased words, [EOS], cut to `max_length` and
padded with [PAD] (mask False). So equal texts give equal rows and different texts differ.
"""
import zlib

import numpy as np


class FakeEncoder:
    def __init__(self, width: int = 6, max_length: int = 8):
        self.width, self.max_length = width, max_length

    def tokens(self, text: str) -> list[str]:
        return (["<bos>"] + text.lower().split() + ["<eos>"])[:self.max_length]

    def vector(self, token: str) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(token.encode()))
        return rng.standard_normal(self.width).astype(np.float32)

    def encode(self, texts):
        hidden = np.zeros((len(texts), self.max_length, self.width), np.float32)
        mask = np.zeros((len(texts), self.max_length), bool)
        for i, text in enumerate(texts):
            toks = self.tokens(text)
            toks = toks + ["<pad>"] * (self.max_length - len(toks))
            for p, tok in enumerate(toks):
                hidden[i, p] = self.vector(tok) + p / 100
                mask[i, p] = tok != "<pad>"
        return hidden, mask

    def __repr__(self):
        return f"FakeEncoder(width={self.width}, max_length={self.max_length})"
