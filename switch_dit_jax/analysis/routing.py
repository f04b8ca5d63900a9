"""Routing pictures of a Switch-DiT checkpoint (Switch-DiT Fig. 3 / Fig. 8 / Fig. A).

    python -m switch_dit_jax.analysis.routing --config=configs/switchdit_b.py --workdir=DIR

writes, from the EMA weights of the latest checkpoint, DIR/analysis/gate_vs_prior.png (the
stacked top-k activation map w_gate of all T timesteps with its columns in the order the
assignment matches to the prior, next to w_prior and to the gate probabilities; rows =
timesteps t = 1..T from top to bottom, columns named by block and expert) and
DIR/analysis/denoising_paths.png (for t = 0.25T, 0.5T, 0.75T and T: the experts each block
activates, joined block to block; experts active at all four t are the shared path). Both are
titled with the run (DIR's name) and the checkpoint's step.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from switch_dit_jax.analysis import figures
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


def matched_order(gate_probs: np.ndarray, top_k: int, alpha: float) -> np.ndarray:
    """For each prior column j, the gate column (block·M + expert) the assignment matches to it."""
    num_tasks, depth, m_exp = gate_probs.shape
    w_gate = switch.gate_activation_map(jnp.asarray(gate_probs), top_k)
    w_prior = switch.prior_activation_map(depth, m_exp, top_k, num_tasks, alpha)
    match = np.asarray(switch.optimal_assignment(
        switch.matching_cost(w_gate, jnp.asarray(w_prior))))
    return np.argsort(match)


def matched_maps(gate_probs: np.ndarray, top_k: int, alpha: float):
    """(w_gate with its columns in the order that matches w_prior, w_prior), both [T, N·M]."""
    num_tasks, depth, m_exp = gate_probs.shape
    w_gate = np.asarray(switch.gate_activation_map(jnp.asarray(gate_probs), top_k))
    w_prior = switch.prior_activation_map(depth, m_exp, top_k, num_tasks, alpha)
    return w_gate[:, matched_order(gate_probs, top_k, alpha)], w_prior


def _column_ticks(ax, labels: list[str]) -> None:
    """Every column named up to 48 columns; beyond, every few (XL has N·M = 84)."""
    every = 1 if len(labels) <= 48 else -(-len(labels) // 24)
    ticks = np.arange(0, len(labels), every)
    ax.set_xticks(ticks)
    ax.set_xticklabels([labels[j] for j in ticks], rotation=90,
                       fontsize=7 if len(labels) > 24 else 8)


def _timestep_ticks(ax, num_tasks: int) -> None:
    ticks = sorted({0, *range(num_tasks // 4 - 1, num_tasks, max(num_tasks // 4, 1))})
    ax.set_yticks(ticks)
    ax.set_yticklabels([str(t + 1) for t in ticks])
    ax.set_ylabel(f"timestep t (1 = least noise, {num_tasks} = pure noise)")


def render_gate_vs_prior(gate_probs: np.ndarray, top_k: int, alpha: float, path: str,
                         run: str = "", step: int | None = None):
    """Switch-DiT Fig. 3 / Fig. 8: three [T, N·M] maps side by side, rows = timesteps 1..T from
    top to bottom: the stacked top-k map w_gate with its columns in the order the assignment
    matches to the prior, the prior w_prior, and the gate probabilities p(e_t) in w_gate's column
    order (colour bar). Returns the figure (already saved to `path`)."""
    num_tasks, depth, m_exp = gate_probs.shape
    order = matched_order(gate_probs, top_k, alpha)
    probs = gate_probs.reshape(num_tasks, -1)[:, order]
    w_gate = np.asarray(switch.gate_activation_map(jnp.asarray(gate_probs), top_k))[:, order]
    w_prior = switch.prior_activation_map(depth, m_exp, top_k, num_tasks, alpha)
    cols = depth * m_exp
    mismatch = 100 * float(np.abs(w_gate - w_prior).mean())
    fig = figures.new_figure(3 * min(max(3.2, 0.2 * cols + 1.2), 5.5), 5.6)
    axes = fig.subplots(1, 3, sharey=True)
    binary = ListedColormap([figures.INACTIVE, figures.ACTIVE])
    shown = dict(aspect="auto", interpolation="nearest")
    axes[0].imshow(w_gate, cmap=binary, vmin=0, vmax=1, **shown)
    axes[1].imshow(w_prior, cmap=binary, vmin=0, vmax=1, **shown)
    image = axes[2].imshow(probs, cmap="viridis", vmin=0, vmax=1, **shown)
    gate_names = [f"b{j // m_exp}·e{j % m_exp}" for j in order]
    panels = ((f"w_gate: top-{top_k} of {m_exp} per block, matched", gate_names,
               "gate column: block b, expert e"),
              (f"w_prior (α={alpha:g}, window k·N={top_k * depth})",
               [str(j) for j in range(cols)], "prior column j"),
              ("gate probability p(e_t), same columns", gate_names,
               "gate column: block b, expert e"))
    for ax, (title, names, xlabel) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        _column_ticks(ax, names)
        ax.set_xlabel(xlabel)
    _timestep_ticks(axes[0], num_tasks)
    fig.colorbar(image, ax=axes[2], label="gate probability", fraction=0.08, pad=0.02)
    fig.legend(handles=[Patch(color=figures.ACTIVE, label="active"),
                        Patch(color=figures.INACTIVE, label="inactive")],
               loc="outside lower center", ncols=2, frameon=False,
               title=f"w_gate, w_prior (they differ in {mismatch:.1f}% of the cells)")
    fig.suptitle(figures.run_title(f"Switch-DiT gates vs diffusion prior ({depth} blocks × "
                                   f"{m_exp} experts)", run, step), fontsize=11)
    return figures.save(fig, path)


def denoising_paths(gate_probs: np.ndarray, top_k: int):
    """(timestep indices at 0.25T, 0.5T, 0.75T, T; active [4, N, M]; shared [N, M] = active at
    all four)."""
    num_tasks, depth, m_exp = gate_probs.shape
    steps = [max(int(round(f * num_tasks)) - 1, 0) for f in (0.25, 0.5, 0.75, 1.0)]
    on = np.zeros((len(steps), depth, m_exp), bool)
    for s, t in enumerate(steps):
        top = np.argsort(-gate_probs[t], axis=-1)[:, :top_k]
        np.put_along_axis(on[s], top, True, axis=-1)
    return steps, on, on.all(axis=0)


def render_denoising_paths(gate_probs: np.ndarray, top_k: int, path: str, run: str = "",
                           step: int | None = None):
    """Switch-DiT Fig. A: for t = 0.25T, 0.5T, 0.75T and T, the experts each block activates
    (blocks from input to output along x, experts along y), joined block to block; experts that
    every one of the four t activates (the shared path) are marked. Returns the figure."""
    num_tasks, depth, m_exp = gate_probs.shape
    steps, on, shared = denoising_paths(gate_probs, top_k)
    fig = figures.new_figure(max(6.0, 0.42 * depth + 2.0), 1.2 + len(steps) * (0.38 * m_exp + 0.5))
    axes = fig.subplots(len(steps), 1, sharex=True)
    blocks = np.arange(depth)
    for ax, t, active in zip(axes, steps, on):
        for i in range(depth - 1):
            for a in np.flatnonzero(active[i]):
                for b in np.flatnonzero(active[i + 1]):
                    ax.plot([i, i + 1], [a, b], color="#888888", linewidth=1.0, zorder=1)
        bb, ee = np.meshgrid(blocks, np.arange(m_exp), indexing="ij")
        ax.scatter(bb[~active], ee[~active], s=40, color="#dddddd", edgecolor="#999999",
                   zorder=2, label="inactive")
        own = active & ~shared
        ax.scatter(bb[own], ee[own], s=70, color="#1f77b4", zorder=3,
                   label="active at this t")
        ax.scatter(bb[shared], ee[shared], s=70, color="#d62728", zorder=3,
                   label="active at all four t (shared path)")
        p = gate_probs[t]
        fraction = "T" if t + 1 == num_tasks else f"{(t + 1) / num_tasks:.2g}T"
        ax.set_title(f"t = {t + 1} ({fraction}); mean gate probability of its active experts "
                     f"{p[active].mean():.2f}", fontsize=9, loc="left")
        ax.set_yticks(np.arange(m_exp))
        ax.set_yticklabels([f"e{j}" for j in range(m_exp)])
        ax.set_ylim(m_exp - 0.5, -0.5)
        ax.set_ylabel("expert")
        ax.grid(True, axis="x", alpha=0.2)
    axes[-1].set_xticks(blocks)
    axes[-1].set_xticklabels([str(i) for i in blocks])
    axes[-1].set_xlabel("block (input → output)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, frameon=False, fontsize=9)
    fig.suptitle(figures.run_title(f"Switch-DiT denoising paths (top-{top_k} of {m_exp} "
                                   "experts per block)", run, step), fontsize=11)
    return figures.save(fig, path)


def routing_pictures(model, params, out_dir: str, run: str = "",
                     step: int | None = None) -> dict[str, str]:
    """gate_vs_prior.png and denoising_paths.png of `params` in `out_dir`; their titles name
    `run` and `step`."""
    r = model.routing
    probs = gate_probabilities(model, params)
    paths = {"gate_vs_prior": os.path.join(out_dir, "gate_vs_prior.png"),
             "denoising_paths": os.path.join(out_dir, "denoising_paths.png")}
    render_gate_vs_prior(probs, r["top_k"], r["alpha"], paths["gate_vs_prior"], run, step)
    render_denoising_paths(probs, r["top_k"], paths["denoising_paths"], run, step)
    w_gate, w_prior = matched_maps(probs, r["top_k"], r["alpha"])
    log.info("routing pictures: %s (w_gate vs matched w_prior differ in %.1f%% of cells)",
             paths, 100 * float(np.abs(w_gate - w_prior).mean()))
    return paths


if __name__ == "__main__":
    from switch_dit_jax.analysis.cli import run_on_workdir

    run_on_workdir(lambda config, workdir, model, mesh, state, shardings, flags: routing_pictures(
        model, jax.device_get(state.ema_params), os.path.join(workdir, "analysis"),
        figures.run_name(workdir), int(state.step)))
