"""A tiny random CLIP in the Hugging Face directory layout, for tests and the CPU T2I
quickstart (which needs a text encoder but no 1.7 GB download):

    python -m switch_dit_jax.text.tiny --out=/tmp/tiny_clip [--words="a cat,the dog"]

It writes config.json (CLIPModel layout, or CLIPTextModel without the vision tower),
model.safetensors (random float32 weights at scales that keep every layer's output varied),
tokenizer.json (a word-level vocabulary over the lower-cased words, then `<|startoftext|>` and
`<|endoftext|>` last as in OpenAI's vocabulary, a BOS/EOS template) and tokenizer_config.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re

import jax.numpy as jnp
import numpy as np

from switch_dit_jax.text.clip import ClipModel, TextTransformer
from switch_dit_jax.text.config import ClipConfig, TextConfig, Tower, VisionConfig
from switch_dit_jax.text.tokenizer import tokenizers_module
from switch_dit_jax.text.weights import abstract_params, text_table, torch_shapes, vision_table

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Every word of the synthetic digit captions ("a handwritten digit seven", "the number 7",
# "an image of a 7", ...); the digits_text data source writes its captions from these.
DIGIT_WORDS = (("a", "an", "the", "of", "image", "picture", "photo", "drawing", "handwritten",
                "digit", "number", "numeral", "written", "by", "hand", "small", "white",
                "black", "on", "background", ",", ".")
               + _NUMBERS + tuple(str(d) for d in range(10)))
_WORD = re.compile(r"\w+|[^\w\s]+")  # the split of tokenizers' Whitespace pre-tokenizer


def vocabulary(words) -> dict[str, int]:
    """Lower-cased words (phrases are split as the tokenizer splits them), then BOS and EOS."""
    vocab: dict[str, int] = {}
    for phrase in words:
        for word in _WORD.findall(str(phrase).lower()):
            if word not in vocab and word not in (BOS.lower(), EOS.lower()):
                vocab[word] = len(vocab)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab


def _write_tokenizer(out_dir: str, vocab: dict[str, int], max_length: int) -> None:
    tk = tokenizers_module()
    models, normalizers = tk.models, tk.normalizers
    pre_tokenizers, processors = tk.pre_tokenizers, tk.processors
    tokenizer = tk.Tokenizer(models.WordLevel(vocab, unk_token=EOS))  # OpenAI's unk is its EOS
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    tokenizer.add_special_tokens([BOS, EOS])
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "bos_token": BOS, "eos_token": EOS,
                   "pad_token": EOS, "unk_token": EOS, "model_max_length": max_length,
                   "do_lower_case": True}, f, indent=2)


def _random(key: str, shape, rng: np.random.Generator) -> np.ndarray:
    if key.endswith("position_embedding.weight"):
        return rng.normal(0.0, 0.1, shape)  # smaller than the tokens, which carry the meaning
    if key.endswith(("token_embedding.weight", "class_embedding")):
        return rng.normal(0.0, 1.0, shape)
    if key.endswith(".bias"):
        return rng.normal(0.0, 0.05, shape)
    if "norm" in key:  # LayerNorm scales near 1
        return 1.0 + rng.normal(0.0, 0.1, shape)
    fan_in = int(np.prod(shape[1:]))  # torch layout: [out, in, ...]
    return rng.normal(0.0, fan_in ** -0.5, shape)


def _text_fields(text: TextConfig, vocab: dict[str, int]) -> dict:
    t = text.tower
    return {"model_type": "clip_text_model", "vocab_size": text.vocab_size,
            "hidden_size": t.width, "intermediate_size": t.mlp_width,
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
            "max_position_embeddings": text.max_length, "hidden_act": t.act,
            "layer_norm_eps": t.eps, "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS],
            "pad_token_id": vocab[EOS], "projection_dim": t.width}


def write_tiny_clip(out_dir: str, words, seed: int = 0, width: int = 32, layers: int = 2,
                    heads: int = 2, max_length: int = 16, vision: bool = True,
                    image_size: int = 32, patch_size: int = 8) -> str:
    """Writes a tiny random CLIP (CLIPModel, or CLIPTextModel if not `vision`) to `out_dir`."""
    from safetensors.numpy import save_file
    vocab = vocabulary(words)
    tower = Tower(width, layers, heads, 4 * width)
    text = TextConfig(tower, len(vocab), max_length, vocab[EOS])
    ids = jnp.zeros((1, max_length), jnp.int32)
    if vision:
        config = ClipConfig(text, VisionConfig(tower, image_size, patch_size), width)
        pixels = jnp.zeros((1, image_size, image_size, 3))
        module, inputs = ClipModel(config), (ids, pixels)
        table = text_table(config, ("text_model",)) | vision_table(config)
        fields = {"architectures": ["CLIPModel"], "model_type": "clip",
                  "projection_dim": width, "logit_scale_init_value": 2.6592,
                  "text_config": _text_fields(text, vocab),
                  "vision_config": {"model_type": "clip_vision_model", "hidden_size": width,
                                    "intermediate_size": 4 * width,
                                    "num_hidden_layers": layers, "num_attention_heads": heads,
                                    "image_size": image_size, "patch_size": patch_size,
                                    "num_channels": 3, "hidden_act": tower.act,
                                    "layer_norm_eps": tower.eps, "projection_dim": width}}
    else:
        config = ClipConfig(text, None, None)
        module, inputs = TextTransformer(text), (ids,)
        table = text_table(config, ())
        fields = {"architectures": ["CLIPTextModel"], **_text_fields(text, vocab)}
    shapes = torch_shapes(table, abstract_params(module, *inputs)["params"])
    rng = np.random.default_rng(seed)
    tensors = {key: _random(key, shape, rng).astype(np.float32)
               for key, shape in sorted(shapes.items())}
    if vision:
        tensors["logit_scale"] = np.asarray(2.6592, np.float32)
    os.makedirs(out_dir, exist_ok=True)
    _write_tokenizer(out_dir, vocab, max_length)  # first: it fails where tokenizers is absent
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(fields, f, indent=2)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Writes a tiny random CLIP in the Hugging "
                                     "Face layout (for tests and the CPU T2I quickstart).")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--words", default=None,
                        help="comma-separated words or phrases (default: DIGIT_WORDS, those of "
                             "the digit captions)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=16)
    parser.add_argument("--no_vision", action="store_true", help="a CLIPTextModel only")
    args = parser.parse_args(argv)
    words = DIGIT_WORDS if args.words is None else args.words.split(",")
    out = write_tiny_clip(args.out, words, args.seed, args.width, args.layers, args.heads,
                          args.max_length, vision=not args.no_vision)
    print(f"wrote a tiny random CLIP to {out}")


if __name__ == "__main__":
    main()
