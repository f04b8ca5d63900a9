"""Text-to-image quickstart: the digits captioned ("a handwritten seven", "the number 7", ...),
a small T2I DiT (cross-attention to CLIP token states), sampled from configs/digit_prompts.txt.

The text encoder is a tiny random CLIP in the Hugging Face layout, written once by
`python -m switch_dit_jax.text.tiny --out=/tmp/tiny_clip` (the default text.encoder_dir below):
random, but a fixed map from captions to token states, which is all the model needs to learn
which digit a caption names. The digits classifier then checks every sample against the digit
its prompt names (digits_classifier_accuracy). See README "Text-to-image".
"""
import os

from switch_dit_jax.config_base import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    config = load_config(os.path.join(HERE, "quickstart.py"))  # its DiT, data and schedule
    config.model.num_classes = 1       # no label table: the captions condition the model
    config.model.conditioning = "text"
    config.model.text_width = 32       # the tiny CLIP's width and token count
    config.model.text_length = 16
    config.model.caption_dropout_prob = 0.1

    config.data.name = "digits_text"
    config.text.encoder_dir = "/tmp/tiny_clip"
    config.sample.prompts = os.path.join(HERE, "digit_prompts.txt")
    return config
