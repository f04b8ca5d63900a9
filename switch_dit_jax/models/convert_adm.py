"""Import of openai/guided-diffusion UNetModel checkpoints (ADM, e.g. `64x64_diffusion.pt`).

The key table follows the layer list of `models/unet.py` (`UNet.layout`), so the model and its
import cannot drift apart; `convert_engine.assemble` uses every key once and checks shapes.
"""
from __future__ import annotations

from typing import Any, Mapping

from switch_dit_jax.errors import UserError
from switch_dit_jax.models import build_model
from switch_dit_jax.models.convert_engine import Param, Table, abstract_variables, assemble, linear
from switch_dit_jax.models.unet import Layer, UNet


def _conv(prefix: str, path: tuple[str, ...]) -> Table:
    """torch Conv2d weight OIHW -> Flax HWIO kernel; bias as is."""
    return {f"{prefix}.weight": Param(path + ("kernel",), lambda w: w.transpose(2, 3, 1, 0)),
            f"{prefix}.bias": Param(path + ("bias",))}


def _conv1x1_as_linear(prefix: str, path: tuple[str, ...]) -> Table:
    """torch Conv1d(kernel 1) weight [out, in, 1] -> Flax Dense kernel [in, out]."""
    return {f"{prefix}.weight": Param(path + ("kernel",), lambda w: w[:, :, 0].T),
            f"{prefix}.bias": Param(path + ("bias",))}


def _norm(prefix: str, path: tuple[str, ...]) -> Table:
    return {f"{prefix}.weight": Param(path + ("scale",)), f"{prefix}.bias": Param(path + ("bias",))}


def _layer(layer: Layer, torch_prefix: str, flax_name: str) -> Table:
    """The keys of one guided-diffusion layer (torch_prefix e.g. 'input_blocks.4.1')."""
    f = (flax_name,)
    if layer.kind == "res":
        table = {**_norm(f"{torch_prefix}.in_layers.0", f + ("in_norm",)),
                 **_conv(f"{torch_prefix}.in_layers.2", f + ("in_conv",)),
                 **linear(f"{torch_prefix}.emb_layers.1", f + ("emb_proj",)),
                 **_norm(f"{torch_prefix}.out_layers.0", f + ("out_norm",)),
                 **_conv(f"{torch_prefix}.out_layers.3", f + ("out_conv",))}
        if layer.out_channels != layer.channels:
            table.update(_conv(f"{torch_prefix}.skip_connection", f + ("skip_connection",)))
        return table
    if layer.kind == "attn":
        return {**_norm(f"{torch_prefix}.norm", f + ("norm",)),
                **_conv1x1_as_linear(f"{torch_prefix}.qkv", f + ("qkv",)),
                **_conv1x1_as_linear(f"{torch_prefix}.proj_out", f + ("proj_out",))}
    if layer.kind == "down":
        return _conv(f"{torch_prefix}.op", (f"{flax_name}_op",))
    if layer.kind == "up":
        return _conv(f"{torch_prefix}.conv", (f"{flax_name}_conv",))
    return _conv(torch_prefix, f)


def adm_key_map(model: UNet) -> Table:
    """guided-diffusion UNetModel key -> Param rule, for every key."""
    layout = model.layout()
    table = {**linear("time_embed.0", ("time_embed_0",)),
             **linear("time_embed.2", ("time_embed_2",))}
    if model.num_classes > 1:
        table["label_emb.weight"] = Param(("label_emb", "embedding"))
    for i, block in enumerate(layout.input_blocks):
        for j, layer in enumerate(block):
            table.update(_layer(layer, f"input_blocks.{i}.{j}", f"input_blocks_{i}_{j}"))
    for j, layer in enumerate(layout.middle_block):
        table.update(_layer(layer, f"middle_block.{j}", f"middle_block_{j}"))
    for i, block in enumerate(layout.output_blocks):
        for j, layer in enumerate(block):
            table.update(_layer(layer, f"output_blocks.{i}.{j}", f"output_blocks_{i}_{j}"))
    table.update(_norm("out.0", ("out_norm",)))
    table.update(_conv("out.2", ("out_conv",)))
    return table


def from_adm_state_dict(state_dict: Mapping[str, Any], model_config) -> dict:
    """guided-diffusion UNetModel state dict -> Flax `params` of `build_model(model_config)`.

    `model_config` must describe the checkpoint (model.backbone='adm' and its model.unet
    options; the released 64x64 ImageNet model is configs/adm_imagenet64.py:openai). Every key
    is used exactly once: a missing, extra or mis-shaped key raises one UserError naming it.
    ADM's label table has no "null" row, so a class-conditional import needs
    model.class_dropout_prob=0 (sampling without classifier-free guidance, cfg_scale=1).
    """
    model = build_model(model_config)
    if not isinstance(model, UNet):
        raise UserError("from_adm_state_dict needs model.backbone='adm' (with model.name="
                        "'ADM'); for DiT checkpoints use from_torch_state_dict.")
    if model.num_classes > 1 and model.null_class:
        raise UserError(f"model.class_dropout_prob={model.class_dropout_prob} adds a null "
                        "class that ADM checkpoints do not have; set "
                        "model.class_dropout_prob=0 (and sample.cfg_scale=1) to import one.")
    layout = (f"a guided-diffusion UNet with model_channels={model.model_channels}, "
              f"channel_mult={model.channel_mult}, num_res_blocks={model.num_res_blocks}, "
              f"attention_resolutions={model.attention_resolutions}, "
              f"resblock_updown={model.resblock_updown}, num_classes={model.num_classes}")
    return assemble(state_dict, adm_key_map(model), abstract_variables(model), layout)["params"]
