"""CLIP in Flax for text-to-image models: the text encoder (captions -> [B, 77, D] hidden states
and a padding mask), the CLIP score of samples against prompts, and a tiny random CLIP.

    encoder = load_text_encoder("/path/clip-vit-large-patch14")   # a Hugging Face CLIP dir
    hidden, mask = encoder.encode(["a photo of a cat"])
    score = clip_score(images_uint8, prompts, "/path/clip-vit-large-patch14")

The weights are Hugging Face's `model.safetensors` as downloaded (no conversion); tokenising
needs the `tokenizers` package, imported only when a tokenizer is loaded or written.
"""
from switch_dit_jax.text.clip_score import Clip, clip_score, clip_scores, load_clip
from switch_dit_jax.text.encoder import TextEncoder, load_text_encoder

__all__ = ["DIGIT_WORDS", "Clip", "TextEncoder", "clip_score", "clip_scores", "load_clip",
           "load_text_encoder", "write_tiny_clip"]


def __getattr__(name):
    # tiny.py is also run as `python -m switch_dit_jax.text.tiny`; importing it here eagerly
    # would make runpy warn that the module was imported before it ran
    if name in ("DIGIT_WORDS", "write_tiny_clip"):
        from switch_dit_jax.text import tiny
        return getattr(tiny, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
