"""Key tables of the official PyTorch checkpoints, one per model family.

Key names and shapes are those of the official `models/*.py` (read there; no code shared):

| family       | repository, file                                 | this package's config   |
| ------------ | ------------------------------------------------ | ----------------------- |
| `dit`        | facebookresearch/DiT `models.py`                 | routing none, ffn mlp   |
| `dense_dit`  | KwaiVGI/DiffMoE `models/models_DiT.py`           | routing none, ffn mlp   |
| `dtr`        | byeongjun-park/DTR `models/DiT/models.py`        | routing dtr             |
| `switch_dit` | byeongjun-park/Switch-DiT `models/DiT/models.py` | routing switch or dtr   |
| `diffmoe`    | KwaiVGI/DiffMoE `models/models_DiffMoE.py`       | ffn diffmoe             |
| `tc_dit`     | KwaiVGI/DiffMoE `models/models_TCDiT.py`         | ffn token_choice        |
| `ec_dit`     | KwaiVGI/DiffMoE `models/models_ECDiT.py`         | ffn expert_choice       |

Every family shares the DiT backbone keys (`x_embedder`, `t_embedder`, `y_embedder`, `blocks.i.
{attn, adaLN_modulation}`, `final_layer`, the frozen `pos_embed`); they differ in the FFN of the
MoE blocks (`blocks.i.mlp.*`) and the routing keys. The MoE families put their mixture in the
blocks the official `interleave` flag chose: the odd blocks (model.ffn.first=1, every=2) or,
without interleave, every block (first=0, every=1). Settings that no tensor records come
from the official run's config: TC-DiT's `MoE_config.capacity` is its experts per token
(model.ffn.top_k), EC-DiT's and DiffMoE's is model.ffn.capacity; the tables the official
models store (DTR masks, the prior map, DiffMoE's EMA decay) are checked against the config.
With model.ffn.swiglu (the DiffMoE repository's use_swiglu) every FFN is a bias-free MoeMLP
(`gate_proj`, `up_proj`, `down_proj`), dense blocks and experts alike. R-TR checkpoints do not
import: their random tables are not this package's (seed, block) draws.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from switch_dit_jax.errors import ConfigError
from switch_dit_jax.models import layers
from switch_dit_jax.models.convert_engine import Buffer, Param, Table, linear
from switch_dit_jax.models.dtr import dtr_masks
from switch_dit_jax.models.switch import prior_activation_map

REPOSITORIES = {
    "dit": "facebookresearch/DiT",
    "dense_dit": "KwaiVGI/DiffMoE (Dense-DiT, models_DiT.py)",
    "dtr": "byeongjun-park/DTR",
    "switch_dit": "byeongjun-park/Switch-DiT",
    "diffmoe": "KwaiVGI/DiffMoE (DiffMoE, models_DiffMoE.py)",
    "tc_dit": "KwaiVGI/DiffMoE (TC-DiT, models_TCDiT.py)",
    "ec_dit": "KwaiVGI/DiffMoE (EC-DiT, models_ECDiT.py)",
}
FAMILIES = tuple(REPOSITORIES)
# family -> (the routing kinds and the FFN kind its checkpoints are trained with)
_NEEDS = {
    "dit": (("none",), "mlp"),
    "dense_dit": (("none",), "mlp"),
    "dtr": (("dtr",), "mlp"),
    "switch_dit": (("switch", "dtr"), "mlp"),
    "diffmoe": (("none",), "diffmoe"),
    "tc_dit": (("none",), "token_choice"),
    "ec_dit": (("none",), "expert_choice"),
}


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)


def backbone_table(depth: int, has_labels: bool, moe_blocks: frozenset[int] = frozenset(),
                   swiglu: bool = False) -> Table:
    """The DiT keys shared by every family, with the dense FFN in blocks not in `moe_blocks`
    (`pos_embed` excluded: its Buffer needs the model's sizes)."""
    table: Table = {
        "x_embedder.proj.weight": Param(("x_embedder", "proj", "kernel"), _oihw_to_hwio),
        "x_embedder.proj.bias": Param(("x_embedder", "proj", "bias")),
    }
    table.update(linear("t_embedder.mlp.0", ("t_embedder", "mlp_0")))
    table.update(linear("t_embedder.mlp.2", ("t_embedder", "mlp_2")))
    if has_labels:
        table["y_embedder.embedding_table.weight"] = Param(("y_embedder", "embedding_table"))
    for i in range(depth):
        parts = [("attn.qkv", ("attn", "qkv")), ("attn.proj", ("attn", "proj")),
                 ("adaLN_modulation.1", ("adaLN_modulation", "linear"))]
        if i not in moe_blocks and swiglu:  # DiffMoE's MoeMLP: bias-free gate, up, down
            for proj in ("gate_proj", "up_proj", "down_proj"):
                table.update(linear(f"blocks.{i}.mlp.{proj}", (f"blocks_{i}", "mlp", proj),
                                    bias=False))
        elif i not in moe_blocks:
            parts += [("mlp.fc1", ("mlp", "fc1")), ("mlp.fc2", ("mlp", "fc2"))]
        for torch_name, flax_path in parts:
            table.update(linear(f"blocks.{i}.{torch_name}", (f"blocks_{i}",) + flax_path))
    table.update(linear("final_layer.linear", ("final_layer", "linear")))
    table.update(linear("final_layer.adaLN_modulation.1",
                        ("final_layer", "adaLN_modulation", "linear")))
    return table


def _experts(prefix: str, block: str, num_experts: int, swiglu: bool = False) -> Table:
    """`prefix.experts.e.fc{1,2}` (one timm Mlp per expert), or with `swiglu`
    `prefix.experts.e.{gate,up,down}_proj` (one bias-free MoeMLP per expert) -> the stacked
    expert weights."""
    table: Table = {}
    for e in range(num_experts):
        if swiglu:
            table.update({f"{prefix}.experts.{e}.{proj}_proj.weight":
                          Param((block, "mlp", "experts", f"{proj}_kernel"), np.transpose, e)
                          for proj in ("gate", "up", "down")})
            continue
        for fc in ("fc1", "fc2"):
            table.update({f"{prefix}.experts.{e}.{fc}.weight":
                          Param((block, "mlp", "experts", f"{fc}_kernel"), np.transpose, e),
                          f"{prefix}.experts.{e}.{fc}.bias":
                          Param((block, "mlp", "experts", f"{fc}_bias"), slot=e)})
    return table


def _router(key: str, block: str) -> Table:
    """The gate weight [E, D] (applied as F.linear(x, W)) -> router [D, E]."""
    return {key: Param((block, "mlp", "router"), np.transpose)}


def _moe_table(family: str, i: int, model, state_dict: Mapping[str, Any]) -> Table:
    ffn, d = model.ffn, model.hidden_size
    prefix, block = f"blocks.{i}.mlp", f"blocks_{i}"
    table = _experts(prefix, block, ffn["num_experts"], ffn["swiglu"])
    if family == "diffmoe":
        table.update(_router(f"{prefix}.gate_weight", block))
        table.update(linear(f"{prefix}.capacity_predictor.0", (block, "mlp", "capacity_fc1")))
        table.update(linear(f"{prefix}.capacity_predictor.2", (block, "mlp", "capacity_fc2")))
        table[f"{prefix}.expert_threshold"] = Param((block, "mlp", "threshold"),
                                                    collection="moe_state")
        table[f"{prefix}.ema_decay"] = Buffer(
            np.array([ffn["threshold_decay"]]), "threshold EMA decay",
            "set model.ffn.threshold_decay to the checkpoint's", atol=1e-6)
    elif family == "ec_dit":
        table.update(_router(f"{prefix}.gate_weight", block))
    else:  # tc_dit
        table.update(_router(f"{prefix}.gate.weight", block))
        # n_shared_experts=0 (not None) leaves empty shared-expert tensors in the state dict:
        # they add nothing, so they are checked to be empty and used up.
        if any(k.startswith(f"{prefix}.shared_experts.") for k in state_dict):
            for name, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)),
                                ("down_proj", (d, 0))):
                table[f"{prefix}.shared_experts.{name}.weight"] = Buffer(
                    np.zeros(shape), "shared expert (none)", "this package's TC-DiT has no "
                    "shared experts, so only checkpoints trained with n_shared_experts None or "
                    "0 import")
    return table


def _routing_table(family: str, model) -> Table:
    r, d, n = model.routing, model.hidden_size, model.depth
    if r["kind"] == "dtr":
        masks = Buffer(dtr_masks(r["num_tasks"], d, r["alpha"], r["beta"]), "DTR mask table",
                       "set model.routing.num_tasks, alpha and beta to the checkpoint's (an R-TR "
                       "checkpoint, whose tables are random, cannot be imported)")
        where = "blocks.{}.routing" if family == "dtr" else "routers.{}"
        return {f"{where.format(i)}._unit_mapping": masks for i in range(n)}
    if r["kind"] != "switch":
        return {}
    t, m, k = r["num_tasks"], r["num_experts"], r["top_k"]
    table: Table = {
        "full_time": Buffer(np.arange(t), "timestep list",
                            "set model.routing.num_tasks to the checkpoint's taskcount"),
        "prior._unit_mapping": Buffer(
            prior_activation_map(n, m, k, t, r["alpha"]), "diffusion prior map",
            "set model.routing.num_tasks, num_experts, top_k and alpha to the checkpoint's "
            "taskcount, num_experts, k and 4.0"),
    }
    for i in range(n):
        table.update(linear(f"routers.{i}.f_gate.1", (f"routers_{i}", "gate")))
        table[f"routers.{i}.experts.w"] = Param((f"routers_{i}", "experts_kernel"))
        table[f"routers.{i}.experts.b"] = Param((f"routers_{i}", "experts_bias"))
    return table


def check_config(family: str, model) -> None:
    """Refuse a model config under which `family`'s checkpoints would compute something else."""
    if family not in REPOSITORIES:
        raise ConfigError(f"checkpoint family {family!r} is unknown; use one of "
                          f"{list(FAMILIES)}.")
    routings, ffn_kind = _NEEDS[family]
    repo = REPOSITORIES[family]
    r, f = model.routing or {"kind": "none"}, model.ffn or {"kind": "mlp"}
    if r["kind"] not in routings:
        raise ConfigError(f"model.routing.kind={r['kind']!r}, but {repo} checkpoints need "
                          f"model.routing.kind in {list(routings)}.")
    if f["kind"] != ffn_kind:
        raise ConfigError(f"model.ffn.kind={f['kind']!r}, but {repo} checkpoints need "
                          f"model.ffn.kind={ffn_kind!r}.")
    if f.get("swiglu") and not repo.startswith("KwaiVGI"):
        raise ConfigError(f"model.ffn.swiglu=True, but {repo} checkpoints have GELU MLPs; set "
                          "model.ffn.swiglu=False.")
    if r["kind"] == "switch":
        for field, official in (("integration", "mask_skip_init"), ("allocation", "learned"),
                                ("noisy_gating", False)):
            if r[field] != official:
                raise ConfigError(f"model.routing.{field}={r[field]!r}, but {repo} checkpoints "
                                  f"are trained with {field}={official!r}; set it so.")


def moe_blocks(model) -> frozenset[int]:
    f = model.ffn or {"kind": "mlp"}
    if f["kind"] == "mlp":
        return frozenset()
    return frozenset(i for i in range(f["first"], model.depth, f["every"]))


def family_table(family: str, model, state_dict: Mapping[str, Any], has_labels: bool) -> Table:
    """Every official key of `family` for `model` -> its Param or Buffer (call check_config
    first)."""
    blocks = moe_blocks(model)
    table: Table = {"pos_embed": Buffer(
        layers.sincos_pos_embed_2d(model.hidden_size, model.grid_size)[None],
        "2-D sin-cos position table",
        f"set model.input_size and model.patch_size to those of the checkpoint (this model: "
        f"input_size={model.input_size}, patch_size={model.patch_size})",
        # The table's entries lie in [-1, 1]: 1e-2 admits a bfloat16 / float16 copy of it
        # (error <= 4e-3) and still refuses any other table, whose entries differ by O(1).
        atol=1e-2)}
    table.update(backbone_table(model.depth, has_labels, blocks,
                                bool((model.ffn or {}).get("swiglu"))))
    for i in sorted(blocks):
        table.update(_moe_table(family, i, model, state_dict))
    table.update(_routing_table(family, model))
    return table


def describe(family: str, model) -> str:
    """The checkpoint a config expects, for error messages."""
    text = (f"an official {REPOSITORIES[family]} checkpoint of depth {model.depth}, hidden size "
            f"{model.hidden_size}, {model.num_classes} classes")
    blocks = sorted(moe_blocks(model))
    if blocks:
        text += (f", {model.ffn['num_experts']} experts in blocks {blocks[:4]}"
                 f"{'...' if len(blocks) > 4 else ''} (model.ffn.first={model.ffn['first']}, "
                 f"every={model.ffn['every']})")
    if model.routing and model.routing["kind"] != "none":
        text += f", routing {model.routing['kind']!r} over {model.routing['num_tasks']} tasks"
    return text
