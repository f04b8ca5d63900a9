"""Text-to-image quickstart: the digits captioned ("a handwritten seven", "the number 7", ...),
a small T2I DiT (cross-attention to CLIP token states), sampled from configs/digit_prompts.txt.

The text encoder is a tiny random CLIP in the Hugging Face layout, written once by
`python -m switch_dit_jax.text.tiny --out=/tmp/tiny_clip` (the default text.encoder_dir below):
random, but a fixed map from captions to token states, which is all the model needs to learn
which digit a caption names. The digits classifier then checks every sample against the digit
its prompt names (digits_classifier_accuracy). See README "Text-to-image".
"""
import os

from switch_dit_jax.config_base import get_base_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    config = get_base_config()
    config.model.name = "custom"       # the DiT of configs/quickstart.py, with text
    config.model.depth = 4
    config.model.hidden_size = 128
    config.model.num_heads = 4
    config.model.patch_size = 4
    config.model.input_size = 8
    config.model.in_channels = 1
    config.model.learn_sigma = True
    config.model.conditioning = "text"
    config.model.text_width = 32       # the tiny CLIP's width and token count
    config.model.text_length = 16
    config.model.caption_dropout_prob = 0.1

    config.data.name = "digits_text"
    config.data.hflip = False          # mirrored digits are other glyphs
    config.text.encoder_dir = "/tmp/tiny_clip"

    config.train.global_batch_size = 128
    config.train.num_steps = 3000
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 100
    config.train.ema_decay = 0.999
    config.train.log_every = 100
    config.train.checkpoint_every = 1000
    config.train.sample_every = 1000

    config.sample.prompts = os.path.join(HERE, "digit_prompts.txt")
    config.sample.num_samples = 100
    config.sample.batch_size = 100
    config.sample.num_steps = 100
    config.sample.cfg_scale = 2.0
    config.sample.clip_denoised = True
    return config
