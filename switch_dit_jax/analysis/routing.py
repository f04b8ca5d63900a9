"""Routing pictures of a Switch-DiT checkpoint (Switch-DiT Fig. 3 / Fig. 8 / Fig. A).

    python -m switch_dit_jax.analysis.routing --config=configs/switchdit_b.py --workdir=DIR

writes DIR/analysis/gate_vs_prior.png (the stacked top-k activation map w_gate of all T
timesteps, its columns matched to the prior, next to w_prior; rows = timesteps t = 1..T from
top to bottom, columns = the N·M experts) and DIR/analysis/denoising_paths.png (for t = 0.25T,
0.5T, 0.75T and T: the experts each block activates; experts active at all four are drawn in
the highlight colour), using the EMA weights of the latest checkpoint.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from switch_dit_jax.models import switch
from switch_dit_jax.train.state import model_params

log = logging.getLogger("switch_dit_jax")


def gate_probabilities(model, params) -> np.ndarray:
    """[T, N, M] softmax gate probabilities of every block for every timestep."""
    if model.routing_kind != "switch" or model.routing["allocation"] != "learned":
        raise ValueError("routing pictures need a Switch-DiT model with learned gates "
                         "(model.routing.kind='switch', allocation='learned').")
    s, c = model.input_size, model.in_channels
    _, aux = model.apply({"params": model_params(params)}, jnp.zeros((1, s, s, c)),
                         jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32),
                         mutable=["aux"])
    probs = [aux["aux"][f"routers_{i}"]["gate_probs"][0] for i in range(model.depth)]
    return np.asarray(jnp.stack(probs, axis=1))


def matched_maps(gate_probs: np.ndarray, top_k: int, alpha: float):
    """(w_gate with its columns in the order that matches w_prior, w_prior), both [T, N·M]."""
    num_tasks, depth, m_exp = gate_probs.shape
    w_gate = np.asarray(switch.gate_activation_map(jnp.asarray(gate_probs), top_k))
    w_prior = switch.prior_activation_map(depth, m_exp, top_k, num_tasks, alpha)
    match = np.asarray(switch.optimal_assignment(
        switch.matching_cost(jnp.asarray(w_gate), jnp.asarray(w_prior))))
    order = np.argsort(match)  # gate column assigned to each prior column
    return w_gate[:, order], w_prior


def _binary_image(w: np.ndarray, width: int, height: int) -> Image.Image:
    """Active cells yellow, inactive purple (the papers' colours), rows = timesteps."""
    rgb = np.where(w[..., None] > 0, np.array([253, 231, 37]), np.array([68, 1, 84]))
    return Image.fromarray(rgb.astype(np.uint8)).resize((width, height), Image.NEAREST)


def render_gate_vs_prior(w_gate: np.ndarray, w_prior: np.ndarray, path: str) -> None:
    cols = w_gate.shape[1]
    cell = max(4, 360 // cols)
    width, height, gap, title = cols * cell, 480, 24, 20
    canvas = Image.new("RGB", (2 * width + 3 * gap, height + title + gap), "white")
    for k, (w, name) in enumerate(((w_gate, "w_gate (matched)"), (w_prior, "w_prior"))):
        x = gap + k * (width + gap)
        canvas.paste(_binary_image(w, width, height), (x, title))
        ImageDraw.Draw(canvas).text((x, 4), name, fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)


def render_denoising_paths(gate_probs: np.ndarray, top_k: int, path: str) -> None:
    """Blocks as rows, experts as cells, one panel per t in (0.25T, 0.5T, 0.75T, T)."""
    num_tasks, depth, m_exp = gate_probs.shape
    steps = [max(int(round(f * num_tasks)) - 1, 0) for f in (0.25, 0.5, 0.75, 1.0)]
    active = np.stack([np.argsort(-gate_probs[t], axis=-1)[:, :top_k] for t in steps])
    on = np.zeros((len(steps), depth, m_exp), bool)
    for s in range(len(steps)):
        for i in range(depth):
            on[s, i, active[s, i]] = True
    shared = on.all(axis=0)
    cell, gap, title = 16, 24, 20
    panel_w = m_exp * cell
    canvas = Image.new("RGB", (max(len(steps) * (panel_w + gap) + gap, 260),
                               depth * cell + title + gap + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for s, t in enumerate(steps):
        x0 = gap + s * (panel_w + gap)
        draw.text((x0, 4), f"t={t + 1}", fill="black")
        for i in range(depth):
            for j in range(m_exp):
                color = (220, 60, 30) if shared[i, j] else (
                    (253, 231, 37) if on[s, i, j] else (68, 1, 84))
                box = (x0 + j * cell, title + i * cell, x0 + (j + 1) * cell - 2,
                       title + (i + 1) * cell - 2)
                draw.rectangle(box, fill=color)
    draw.text((gap, title + depth * cell + 4),
              "rows: blocks; red: active at all four t; yellow: active", fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)


def routing_pictures(model, params, out_dir: str) -> dict[str, str]:
    r = model.routing
    probs = gate_probabilities(model, params)
    w_gate, w_prior = matched_maps(probs, r["top_k"], r["alpha"])
    paths = {"gate_vs_prior": os.path.join(out_dir, "gate_vs_prior.png"),
             "denoising_paths": os.path.join(out_dir, "denoising_paths.png")}
    render_gate_vs_prior(w_gate, w_prior, paths["gate_vs_prior"])
    render_denoising_paths(probs, r["top_k"], paths["denoising_paths"])
    mismatch = float(np.abs(w_gate - w_prior).mean())
    log.info("routing pictures: %s (w_gate vs matched w_prior differ in %.1f%% of cells)",
             paths, 100 * mismatch)
    return paths


def main(argv) -> None:
    del argv
    from absl import flags
    from switch_dit_jax.train.loop import restore_latest

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    try:
        model, mesh, state, shardings = restore_latest(config, workdir)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    routing_pictures(model, jax.device_get(state.ema_params), os.path.join(workdir, "analysis"))


if __name__ == "__main__":
    from absl import app, flags as absl_flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    absl_flags.DEFINE_string("workdir", None, "Run directory with checkpoints.")
    app.run(main)
