"""Data layer: grain sources (digits, digits_text, ArrayRecord latents with or without captions,
TFDS) and the training loader."""
from switch_dit_jax.data.captions import DigitsTextSource, load_empty_caption
from switch_dit_jax.data.pipeline import AugmentTransform, global_batch, make_train_loader
from switch_dit_jax.data.sources import (
    DigitsSource,
    LatentShardWriter,
    LatentSource,
    TfdsSource,
    center_crop_arr,
    decode_latent_record,
    encode_latent_record,
    make_source,
    write_latent_shards,
)

__all__ = [
    "AugmentTransform", "DigitsSource", "DigitsTextSource", "LatentShardWriter",
    "LatentSource", "TfdsSource", "center_crop_arr", "decode_latent_record",
    "encode_latent_record", "global_batch", "load_empty_caption", "make_source",
    "make_train_loader", "write_latent_shards",
]
