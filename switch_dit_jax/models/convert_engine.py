"""The engine of the checkpoint imports: an official state dict and a key table -> Flax variables.

A key table maps every key of an official PyTorch state dict to one of
* `Param`: a tensor that becomes a Flax variable, or the slice `slot` of one along its leading
  axis (the official repos keep each expert as its own module; this package stacks them);
* `Buffer`: a tensor the official code stores but this package computes from the config (the
  position table, DTR masks, the prior map, ...). It is compared with the computed value, not
  imported, so that a checkpoint trained under another config is refused instead of silently
  run with the wrong tables.
`assemble` uses every key exactly once, checks every shape, and checks that every variable of
the model was filled. The family tables live in `convert_families.py`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switch_dit_jax.errors import UserError

Transform = Callable[[np.ndarray], np.ndarray]
COLLECTIONS = ("params", "moe_state")  # what an import fills; 'aux' is per-step output


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T


@dataclasses.dataclass(frozen=True)
class Param:
    """An official tensor that becomes the Flax variable `collection`/`path` (or its [slot])."""
    path: tuple[str, ...]
    transform: Transform = _same
    slot: int | None = None
    collection: str = "params"


@dataclasses.dataclass(frozen=True)
class Buffer:
    """An official tensor this package computes itself: it must equal `value` within `atol`.

    `what` names the table in the error message, `hint` says which config fields decide it.
    """
    value: np.ndarray
    what: str
    hint: str
    atol: float = 0.0


Table = dict[str, "Param | Buffer"]


def linear(prefix: str, path: tuple[str, ...], slot: int | None = None, bias: bool = True
           ) -> Table:
    """torch Linear weight [out, in] -> Flax kernel [in, out]; the bias as is."""
    table: Table = {f"{prefix}.weight": Param(path + ("kernel",), _transpose, slot)}
    if bias:
        table[f"{prefix}.bias"] = Param(path + ("bias",), _same, slot)
    return table


def abstract_variables(model: nn.Module) -> dict[str, Any]:
    """Shapes of the model's `params` (and `moe_state` where it has one), without computing."""
    from switch_dit_jax.models import example_condition  # the package imports this module

    s = model.input_size
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, s, s, model.in_channels)), jnp.zeros((1,)),
        example_condition(model)))
    return {k: v for k, v in nn.unbox(abstract).items() if k in COLLECTIONS}


def _leaf(tree: Mapping, collection: str, path: tuple[str, ...]):
    node = tree.get(collection, {})
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _flat(tree: Mapping) -> dict[tuple[str, ...], Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in leaves}


def assemble(state_dict: Mapping[str, Any], table: Table, expected: Mapping[str, Any],
             layout: str) -> dict[str, Any]:
    """Flax variables {collection: tree} from `state_dict` by `table`.

    `expected` are the model's abstract variables; `layout` describes the checkpoint the config
    expects (it ends the error messages, e.g. "a byeongjun-park/DTR checkpoint of depth 12").
    Raises UserError naming the first missing, unexpected or mis-shaped key.
    """
    given = set(state_dict)
    missing = sorted(set(table) - given)
    extra = sorted(given - set(table))
    if missing:
        raise UserError(f"state dict is missing official key {missing[0]!r} ({len(missing)} "
                        f"missing in all); this model config expects {layout}.")
    if extra:
        raise UserError(f"state dict has unexpected key {extra[0]!r} ({len(extra)} unexpected "
                        f"in all); it does not belong to this model config, which expects "
                        f"{layout}.")

    slots: dict[tuple[str, tuple[str, ...]], dict[int, np.ndarray]] = {}
    out: dict[str, dict] = {}
    for key, rule in table.items():
        value = np.asarray(state_dict[key], np.float32)
        if isinstance(rule, Buffer):
            _check_buffer(key, value, rule)
            continue
        value = rule.transform(value)
        want = _leaf(expected, rule.collection, rule.path)
        if want is None:
            raise UserError(f"state dict key {key!r} has no place in this model (no variable "
                            f"{rule.collection}/{'/'.join(rule.path)}); this model config "
                            f"expects {layout}.")
        want_shape = tuple(want.shape) if rule.slot is None else tuple(want.shape[1:])
        if value.shape != want_shape:
            raise UserError(f"state dict key {key!r} converts to shape {value.shape} but the "
                            f"model expects {want_shape} at {'/'.join(rule.path)}; check the "
                            "model config (size, patch, channels, classes, learn_sigma, "
                            "experts) against the checkpoint.")
        if rule.slot is None:
            _put(out, rule.collection, rule.path, value)
        else:
            slots.setdefault((rule.collection, rule.path), {})[rule.slot] = value
    for (collection, path), parts in slots.items():
        count = _leaf(expected, collection, path).shape[0]
        if sorted(parts) != list(range(count)):
            absent = sorted(set(range(count)) - set(parts))
            raise UserError(f"state dict holds {len(parts)} of the {count} experts of "
                            f"{'/'.join(path)} (expert {absent[0]} absent); this model config "
                            f"expects {layout}.")
        _put(out, collection, path, np.stack([parts[i] for i in range(count)]))

    unfilled = sorted(set(_flat({c: expected[c] for c in expected})) - set(_flat(out)))
    if unfilled:
        raise UserError(f"this model has variable {'/'.join(unfilled[0])!r}, which {layout} "
                        "does not hold; set the model config to the one the checkpoint was "
                        "trained with.")
    return jax.tree.map(jnp.asarray, out)


def _check_buffer(key: str, value: np.ndarray, rule: Buffer) -> None:
    want = np.asarray(rule.value, np.float32)
    if value.shape != want.shape:
        raise UserError(f"state dict key {key!r} has shape {value.shape} but this model's "
                        f"{rule.what} has shape {want.shape}; {rule.hint}.")
    if value.size:
        error = float(np.max(np.abs(value - want)))
        if not error <= rule.atol:
            raise UserError(f"state dict key {key!r} differs from this model's {rule.what} by "
                            f"up to {error:.3g}; {rule.hint}.")


def _put(out: dict, collection: str, path: tuple[str, ...], value: np.ndarray) -> None:
    node = out.setdefault(collection, {})
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
