"""Quickstart: a small class-conditional DiT on the embedded 8x8 digits (scikit-learn), CPU.

Trains in a few minutes on a 2-core CPU and writes an EMA sample grid; see README Quickstart.
"""
from switch_dit_jax.config_base import get_base_config


def get_config():
    config = get_base_config()
    config.model.name = "custom"       # a DiT smaller than DiT-S, sized for the 8x8 digits
    config.model.depth = 4
    config.model.hidden_size = 128
    config.model.num_heads = 4
    config.model.patch_size = 4        # 2x2 = 4 tokens: cheap enough for a 2-core CPU
    config.model.input_size = 8
    config.model.in_channels = 1
    config.model.num_classes = 10
    config.model.learn_sigma = True

    config.data.name = "digits"        # embedded: scikit-learn's 1797 handwritten digits
    config.data.hflip = False          # mirrored digits are other glyphs (2, 3, 7 ...)

    config.train.global_batch_size = 128
    config.train.num_steps = 3000
    config.train.learning_rate = 1e-3  # a small model on a tiny dataset trains faster
    config.train.warmup_steps = 100
    config.train.ema_decay = 0.999     # 0.9999 averages over more steps than the run has
    config.train.log_every = 100
    config.train.checkpoint_every = 1000
    config.train.sample_every = 1000

    config.sample.num_samples = 100
    config.sample.batch_size = 100
    config.sample.num_steps = 100
    config.sample.cfg_scale = 2.0
    config.sample.clip_denoised = True  # pixel data live in [-1, 1]
    return config
