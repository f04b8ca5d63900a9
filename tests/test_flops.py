"""Analytic FLOPs against the DiT paper's Gflops column, the structure of each family, and
XLA's own count; the peak table and MFU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switch_dit_jax.models import build_model, flops


# DiT paper (Peebles & Xie 2023) Table 4, Gflops per 256x256 image (fvcore's multiply-adds).
@pytest.mark.parametrize("name,gflops", [("DiT-S/2", 6.06), ("DiT-S/4", 1.41), ("DiT-S/8", 0.36),
                                         ("DiT-B/2", 23.01), ("DiT-L/2", 80.71),
                                         ("DiT-XL/2", 118.64), ("DiT-XL/4", 29.05),
                                         ("DiT-XL/8", 7.39)])
def test_dit_forward_matches_the_dit_paper(name, gflops):
    got = flops.forward_macs_per_image(build_model(dict(name=name)))["total"] / 1e9
    assert abs(got - gflops) <= max(1e-3 * gflops, 0.006), got


def test_dtr_adds_no_matmul_and_switch_dit_adds_one_mask_matmul_per_token():
    dit = flops.forward_macs_per_image(build_model(dict(name="DiT-B/2")))["total"]
    dtr = flops.forward_macs_per_image(build_model(dict(name="DiT-B/2", routing=dict(kind="dtr"))))
    assert dtr["total"] == dit
    sw = build_model(dict(name="DiT-B/2", routing=dict(kind="switch")))
    d, s = 768, 256
    assert flops.forward_macs_per_image(sw)["total"] == dit + 12 * (s * d * d + 3 * d * d)
    assert flops.per_step_extra_macs(sw) == 1000 * (256 * d + d * d + 12 * d * 3)
    assert flops.train_flops_per_step(sw, 8) == 6 * (8 * (dit + 12 * (s * d * d + 3 * d * d))
                                                     + flops.per_step_extra_macs(sw))


def test_mixtures_count_their_activated_experts():
    base = dict(name="DiT-S/2")
    d, s, ffn = 384, 256, 2 * 384 * 1536
    dense = flops.forward_macs_per_image(build_model(base))["total"]
    layers = 6  # odd blocks of 12
    diffmoe = build_model(dict(base, ffn=dict(kind="diffmoe", num_experts=16)))
    assert flops.forward_macs_per_image(diffmoe)["total"] == \
        dense + layers * s * (d * 16 + d * d + d * 16)
    # C_infer scales only the expert part
    assert flops.forward_macs_per_image(diffmoe, capacity=0.5)["total"] == \
        dense + layers * s * (d * 16 + d * d + d * 16 - 0.5 * ffn)
    tc = build_model(dict(base, ffn=dict(kind="token_choice", num_experts=8, top_k=2)))
    assert flops.forward_macs_per_image(tc)["total"] == dense + layers * s * (d * 8 + ffn)
    ec = build_model(dict(base, ffn=dict(kind="expert_choice", num_experts=8, capacity=2.0)))
    assert flops.forward_macs_per_image(ec)["total"] == dense + layers * s * (d * 8 + ffn)


def test_analytic_count_agrees_with_xla_cost_analysis():
    """XLA also counts elementwise work, so its figure is a little larger, never smaller."""
    model = build_model(dict(name="custom", depth=2, hidden_size=256, num_heads=4, patch_size=2,
                             input_size=16, in_channels=4, num_classes=10))
    x, t, y = jnp.zeros((4, 16, 16, 4)), jnp.zeros((4,)), jnp.zeros((4,), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), x, t, y)
    analysis = jax.jit(model.apply).lower(params, x, t, y).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    ours = 2 * 4 * flops.forward_macs_per_image(model)["total"]
    assert 1.0 <= analysis["flops"] / ours < 1.15, analysis["flops"] / ours


def test_peak_table_and_mfu():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert flops.peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert flops.peak_flops("NVIDIA A100-SXM4-40GB", "bfloat16") == 312e12
    assert flops.peak_flops("TPU v4", "bfloat16") == 275e12
    assert flops.peak_flops("TPU v5 lite", "bfloat16") == 197e12
    assert flops.peak_flops("TPU v5p", "bfloat16") == 459e12
    assert flops.peak_flops("cpu", "float32") is None
    # DiT-XL/2 at 694 images/s on one H100 is the 50 % MFU
    xl = build_model(dict(name="DiT-XL/2"))
    per_image = flops.train_flops_per_step(xl, 1)
    assert np.isclose(flops.mfu(694 * per_image, "H100", "bfloat16", 1), 0.5, atol=0.002)
    assert flops.sample_flops_per_image(xl, 250, cfg=True) == \
        2 * 2 * 250 * flops.forward_macs_per_image(xl)["total"]


def test_swiglu_shared_experts_and_head_dim_against_hand_counts():
    base = dict(name="DiT-S/2")
    d, s, h, depth, layers = 384, 256, 1536, 12, 6  # mixtures in the 6 odd blocks
    dense = flops.forward_macs_per_image(build_model(base))["total"]
    # SwiGLU FFNs: gate, up (D x h) and down (h x D) instead of fc1, fc2 in every block.
    swiglu = build_model(dict(base, ffn=dict(swiglu=True)))
    assert flops.forward_macs_per_image(swiglu)["total"] == dense + depth * s * d * h
    # DiffMoE's shared expert: one GELU MLP D -> 2h -> D per mixture layer, on every token.
    plain = flops.forward_macs_per_image(build_model(dict(base, ffn=dict(kind="diffmoe"))))
    shared = build_model(dict(base, ffn=dict(kind="diffmoe", shared_experts=1)))
    assert flops.forward_macs_per_image(shared)["total"] == \
        plain["total"] + layers * s * 2 * d * 2 * h
    # TC-DiT's shared SwiGLU of width 2·D: three D x 2D matmuls per token.
    tc = dict(base, ffn=dict(kind="token_choice", num_experts=8))
    tc_plain = flops.forward_macs_per_image(build_model(tc))["total"]
    tc_shared = build_model(dict(tc, ffn=dict(tc["ffn"], shared_experts=2)))
    assert flops.forward_macs_per_image(tc_shared)["total"] == \
        tc_plain + layers * s * 3 * d * 2 * d
    # head_dim 32 with 6 heads: qkv D -> 3·192, proj 192 -> D, QKᵀ and PV over 192 features.
    narrow = flops.forward_macs_per_image(build_model(dict(base, head_dim=32)))
    assert narrow["attention"] == depth * s * (3 * d * 192 + 192 * d + 2 * s * 192)
    assert narrow["total"] == dense - depth * s * (4 * d * 192 + 2 * s * 192)


TINY_ADM = dict(backbone="adm", name="ADM", input_size=8, in_channels=1, num_classes=10,
                class_dropout_prob=0.1, learn_sigma=True,
                unet=dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                          attention_resolutions=(4,), num_heads=2, resblock_updown=True,
                          use_new_attention_order=True))


def test_adm_unet_forward_matches_a_hand_count():
    """The quickstart UNet written out layer by layer (guided-diffusion's module order):
    3x3 convs 9·Cin·Cout per output pixel, 1x1 skips Cin·Cout, attention S(4C² + 2SC),
    per-image embedding projections to 2·Cout (scale-shift norm)."""
    def conv3(n, cin, cout):
        return n * n * 9 * cin * cout

    def res(n, cin, cout):  # in_conv, zero out_conv, 1x1 skip when the width changes
        return conv3(n, cin, cout) + conv3(n, cout, cout) + (n * n * cin * cout if cin != cout
                                                             else 0)

    attn4 = 16 * (4 * 64 * 64 + 2 * 16 * 64)
    resblocks = (res(8, 32, 32) + res(4, 32, 32)                     # input: 8x8, down to 4x4
                 + res(4, 32, 64)                                    # input, level 1
                 + 2 * res(4, 64, 64)                                # middle
                 + res(4, 128, 64) + res(4, 96, 64) + res(8, 64, 64)  # output level 1 + up
                 + res(8, 96, 32) + res(8, 64, 32))                  # output level 0
    attention = 4 * attn4   # input level 1, middle, two output blocks of level 1
    conditioning = 32 * 128 + 128 * 128 + 128 * (2 * 32 * 4 + 2 * 64 * 6)  # 4 + 6 ResBlocks
    stem_and_out = conv3(8, 1, 32) + conv3(8, 32, 2)
    got = flops.forward_macs_per_image(build_model(TINY_ADM))
    assert got == dict(conditioning=conditioning, resblocks=resblocks, attention=attention,
                       resample=0, stem_and_out=stem_and_out,
                       total=conditioning + resblocks + attention + stem_and_out)
    # plain strided-conv / upsample-conv resampling instead of resblock_updown
    plain = build_model(dict(TINY_ADM, unet=dict(TINY_ADM["unet"], resblock_updown=False)))
    parts = flops.forward_macs_per_image(plain)
    assert parts["resample"] == 16 * 9 * 32 * 32 + conv3(8, 64, 64)
    assert parts["resblocks"] == resblocks - res(4, 32, 32) - res(8, 64, 64)


def test_conv_taps_inside_the_image():
    # 3 taps per output pixel minus the one on the padding at each border
    assert flops._conv_taps(8, 3, 1, count_padding=False) == 3 * 8 - 2
    assert flops._conv_taps(8, 3, 2, count_padding=False) == 3 * 4 - 1  # only the first row
    assert flops._conv_taps(8, 1, 1, count_padding=False) == 8
    assert flops._conv_taps(8, 3, 2, count_padding=True) == 12


@pytest.mark.parametrize("updown", [False, True])
def test_adm_count_agrees_with_xla_cost_analysis(updown):
    """XLA counts 2 FLOPs per MAC but only the kernel taps inside the image (on 8x8 maps the
    zero padding is 16 % of a 3x3 conv's taps, so that convention is compared), plus the
    elementwise work we leave out (GroupNorm, SiLU, softmax, residual adds), which at these
    widths (>= 32 channels against 9·C MACs per output) is a few per cent: the ratio lies in
    [1, 1.05) (measured 1.02)."""
    model = build_model(dict(TINY_ADM, unet=dict(TINY_ADM["unet"], resblock_updown=updown)))
    x, t, y = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,)), jnp.zeros((2,), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), x, t, y)
    analysis = jax.jit(model.apply).lower(params, x, t, y).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    inside = 2 * 2 * flops.unet_forward_macs_per_image(model, count_padding=False)["total"]
    assert 1.0 <= analysis["flops"] / inside < 1.05, analysis["flops"] / inside
    with_padding = 2 * 2 * flops.forward_macs_per_image(model)["total"]
    assert analysis["flops"] < with_padding


def test_training_log_mfu_counts_the_unet(monkeypatch):
    from ml_collections import config_dict

    from switch_dit_jax.train import loop
    monkeypatch.setattr(flops, "peak_flops", lambda kind, dtype: 1e12)
    model = build_model(TINY_ADM)
    config = config_dict.ConfigDict(dict(model=dict(compute_dtype="float32"),
                                         train=dict(global_batch_size=4)))
    step_flops, peak = loop._train_flops_and_peak(model, config)
    assert step_flops == 6 * 4 * flops.forward_macs_per_image(model)["total"]
    assert peak == 1e12 * jax.device_count()


def test_text_cross_attention_against_a_hand_count():
    base = dict(name="custom", depth=2, hidden_size=64, num_heads=4, patch_size=2,
                input_size=8, in_channels=4, num_classes=1)
    plain = flops.forward_macs_per_image(build_model(base))
    text = flops.forward_macs_per_image(build_model(dict(base, conditioning="text",
                                                         text_width=48, text_length=10)))
    s, d, length, dt = 16, 64, 10, 48
    per_block = s * d * d * 2 + length * dt * d * 2 + s * length * d * 2  # q,proj; k,v; QKᵀ,PV
    assert text["cross_attention"] == 2 * per_block
    # The text model has no label table, which costs nothing: the rest is unchanged.
    assert text["total"] - text["cross_attention"] == plain["total"]
