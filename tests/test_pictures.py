"""The pictures: routing maps of a Switch-DiT quickstart run trained a few steps, the DiffMoE
capacity picture, and run curves from metrics.jsonl files written here. Checked through the
returned figures (titles, axes, legends, plotted data against values computed here), never by
reading pixels; the PNGs only for existing with a size that fits their content."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from scipy.optimize import linear_sum_assignment

from switch_dit_jax.analysis import capacity, curves, figures, routing
from switch_dit_jax.config_base import load_config
from switch_dit_jax.errors import UserError
from switch_dit_jax.models import switch
from switch_dit_jax.train import loop
from switch_dit_jax.validation import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART_SWITCH = os.path.join(ROOT, "configs", "quickstart_switchdit.py")


def png_size(path):
    with Image.open(path) as image:
        return image.size


def axis_labels(fig):
    return [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes if ax.get_visible()]


@pytest.fixture(scope="module")
def switch_run(tmp_path_factory):
    """The Switch-DiT quickstart (routing, prior loss) trained 3 steps at batch 16, with a
    narrower model (width 32, 2 heads) so that compiling its step stays short."""
    config = load_config(QUICKSTART_SWITCH, {
        "model.hidden_size": 32, "model.num_heads": 2,
        "train.num_steps": 3, "train.global_batch_size": 16, "train.log_every": 1,
        "train.checkpoint_every": 3, "train.sample_every": 0, "train.warmup_steps": 1})
    validate_config(config, num_devices=jax.device_count())
    workdir = str(tmp_path_factory.mktemp("runs") / "qs_switch")
    loop.train_and_evaluate(config, workdir)
    model, _, state, _ = loop.restore_latest(config, workdir)
    return model, jax.device_get(state.ema_params), int(state.step), workdir


def test_the_switchdit_quickstart_trains_with_the_prior_loss(switch_run):
    model, _, step, workdir = switch_run
    assert step == 3 and model.routing_kind == "switch" and model.depth == 4
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r for r in rows if "prior_loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["prior_loss"] > 0 for r in losses)


def test_gate_vs_prior_shows_the_optimally_matched_maps(switch_run, tmp_path):
    model, params, step, workdir = switch_run
    # Gates far from uniform, so that top-k, matching and colours are not all ties.
    params = jax.tree_util.tree_map_with_path(
        lambda path, w: w + 0.3 * np.cos(np.arange(w.size).reshape(w.shape))
        if "gate" in jax.tree_util.keystr(path) else w, params)
    probs = routing.gate_probabilities(model, params)
    num_tasks, depth, m_exp = probs.shape
    path = str(tmp_path / "gate_vs_prior.png")
    fig = routing.render_gate_vs_prior(probs, 2, 4.0, path, run="qs_switch", step=step)

    assert "qs_switch" in fig._suptitle.get_text() and "step 3" in fig._suptitle.get_text()
    width, height = png_size(path)
    assert 900 <= width <= 2400 and 500 <= height <= 1000
    gate_ax, prior_ax, prob_ax = (ax for ax in fig.axes if ax.images)
    shown_gate, shown_prior = (np.asarray(ax.images[0].get_array()) for ax in
                               (gate_ax, prior_ax))
    # Brute force: the top-2 of every block at every t, and scipy's optimal assignment.
    top = np.argsort(-probs, axis=-1)[..., :2]
    w_gate = np.zeros_like(probs)
    np.put_along_axis(w_gate, top, 1.0, axis=-1)
    w_gate = w_gate.reshape(num_tasks, -1)
    w_prior = switch.prior_activation_map(depth, m_exp, 2, num_tasks, 4.0)
    np.testing.assert_array_equal(shown_prior, w_prior)
    cost = np.abs(w_gate[:, :, None] - w_prior[:, None, :]).sum(0)
    rows, cols = linear_sum_assignment(cost)
    assert np.abs(shown_gate - w_prior).sum() == cost[rows, cols].sum()
    assert sorted(shown_gate.sum(0)) == sorted(w_gate.sum(0))  # a column permutation of w_gate
    # The probability panel shows p in the gate panel's column order, with a colour bar.
    labels = [t.get_text() for t in gate_ax.get_xticklabels()]
    order = [int(s[1:s.index("·")]) * m_exp + int(s[s.index("e") + 1:]) for s in labels]
    np.testing.assert_allclose(np.asarray(prob_ax.images[0].get_array()),
                               probs.reshape(num_tasks, -1)[:, order], rtol=1e-6)
    np.testing.assert_array_equal(shown_gate, w_gate[:, order])
    assert any(ax.get_ylabel() == "gate probability" for ax in fig.axes)  # the colour bar
    assert fig.legends and "timestep" in gate_ax.get_ylabel()
    assert all(x for x, _ in axis_labels(fig)[:3])


def test_denoising_paths_mark_the_top_k_experts_and_the_shared_ones(switch_run, tmp_path):
    model, params, step, _ = switch_run
    params = jax.tree_util.tree_map_with_path(
        lambda path, w: w + 0.5 * np.sin(1.0 + np.arange(w.size).reshape(w.shape))
        if "gate" in jax.tree_util.keystr(path) else w, params)
    probs = routing.gate_probabilities(model, params)
    path = str(tmp_path / "denoising_paths.png")
    fig = routing.render_denoising_paths(probs, 2, path, run="qs_switch", step=step)
    assert "qs_switch" in fig._suptitle.get_text() and "step 3" in fig._suptitle.get_text()
    width, height = png_size(path)
    assert 700 <= width <= 2000 and 700 <= height <= 1400  # not the old 320 x 120

    ts = [249, 499, 749, 999]  # 0.25T, 0.5T, 0.75T, T of T = 1000, 0-based
    active = [{(b, e) for b in range(4) for e in np.argsort(-probs[t, b])[:2]} for t in ts]
    shared = set.intersection(*active)
    panels = [ax for ax in fig.axes if ax.collections]
    assert len(panels) == 4
    for ax, t, on in zip(panels, ts, active):
        assert f"t = {t + 1}" in ax.get_title(loc="left") and ax.get_ylabel() == "expert"
        points = {c.get_label(): {tuple(map(int, p)) for p in c.get_offsets()}
                  for c in ax.collections}
        assert points["active at all four t (shared path)"] == shared
        assert points["active at this t"] == on - shared
        assert len(points["inactive"]) == 4 * 3 - len(on)
    assert panels[-1].get_xlabel().startswith("block") and fig.legends


def test_routing_cli_titles_the_pictures_with_the_run_and_step(switch_run):
    model, params, step, workdir = switch_run
    paths = routing.routing_pictures(model, params, os.path.join(workdir, "analysis"),
                                     figures.run_name(workdir), step)
    assert figures.run_name(workdir) == "qs_switch"
    assert all(os.path.getsize(p) > 10_000 for p in paths.values())


def test_capacity_picture_plots_the_recorded_capacities(tmp_path):
    per_layer = np.array([[1.0, 0.5], [1.5, 0.75], [2.0, 1.0], [0.5, 1.25]])  # [steps, layers]
    summary = {"t": [0.0, 0.25, 0.5, 0.75], "c_infer": per_layer.mean(1).tolist(),
               "c_infer_per_layer": per_layer.tolist(), "c_infer_avg": float(per_layer.mean())}
    path = str(tmp_path / "capacity.png")
    fig = capacity.render(summary, path, run="qs_moe", step=3000)
    assert "qs_moe" in fig._suptitle.get_text() and "step 3,000" in fig._suptitle.get_text()
    width, height = png_size(path)
    assert 700 <= width <= 1600 and 500 <= height <= 1200
    heat = next(ax for ax in fig.axes if ax.images)
    np.testing.assert_array_equal(np.asarray(heat.images[0].get_array()), per_layer.T)
    line_ax = next(ax for ax in fig.axes if ax.get_lines())
    lines = {ln.get_label(): ln.get_ydata() for ln in line_ax.get_lines()}
    np.testing.assert_allclose(lines["$C_\\mathrm{infer}$ (all layers)"], [0.75, 1.125, 1.5, 0.875])
    np.testing.assert_allclose(lines["MoE layer 1"], per_layer[:, 1])
    assert "1.062" in line_ax.get_title(loc="left")  # the average of the 8 values
    assert "sampling step" in line_ax.get_xlabel() and line_ax.get_legend() is not None
    assert any(ax.get_ylabel().startswith("layer capacity") for ax in fig.axes)  # colour bar


def write_run(path, rows):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture
def two_runs(tmp_path):
    a = write_run(tmp_path / "dit", [
        {"step": 100, "loss": 1.0, "loss/t_bucket_0": 0.4, "loss/t_bucket_1": 0.2},
        {"step": 200, "loss": 2.0, "loss/t_bucket_0": 0.2, "loss/t_bucket_1": 0.1},
        {"step": 200, "eval/digits_fd": 7.0, "eval/digits_classifier_accuracy": 0.5},
        {"step": 300, "loss": 3.0, "loss/t_bucket_0": 0.1, "loss/t_bucket_1": 0.05},
        {"step": 300, "steps_per_sec": 4.0},
        {"step": 400, "eval/digits_fd": 3.0, "eval/digits_classifier_accuracy": 0.9}])
    b = write_run(tmp_path / "switchdit", [
        {"step": 100, "loss": 4.0}, {"step": 200, "loss": 2.0},
        {"step": 200, "eval/digits_fd": 5.0, "eval/digits_classifier_accuracy": 0.6},
        {"step": 400, "eval/digits_fd": 2.0, "eval/digits_classifier_accuracy": 0.95}])
    return a, b


def test_curves_draw_one_line_per_run_with_smoothing_and_a_legend(two_runs):
    fig = curves.plot_runs(list(two_runs), ["loss", "fd", "accuracy", "loss_t"], smoothing=0.5)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["dit", "switchdit"]
    loss_ax, fd_ax, acc_ax, bucket_ax = [ax for ax in fig.axes if ax.get_visible()]
    bold = {ln.get_label(): ln for ln in loss_ax.get_lines() if not ln.get_label().startswith("_")}
    assert set(bold) == {"dit", "switchdit"}
    # Debiased EMA with w = 0.5 by hand: m = 0.5, 1.25, 2.125 (dit), 2, 2 (switchdit) over
    # 1 - 0.5^i = 0.5, 0.75, 0.875.
    np.testing.assert_allclose(bold["dit"].get_ydata(), [1.0, 1.25 / 0.75, 2.125 / 0.875])
    np.testing.assert_allclose(bold["switchdit"].get_ydata(), [4.0, 2.0 / 0.75])
    assert len(loss_ax.get_lines()) == 4  # and each run's logged values, faintly
    fd = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()))
          for ln in fd_ax.get_lines()}
    assert fd == {"dit": ([200, 400], [7.0, 3.0]), "switchdit": ([200, 400], [5.0, 2.0])}
    assert [ln.get_label() for ln in acc_ax.get_lines()] == ["dit", "switchdit"]
    (bucket_line,) = bucket_ax.get_lines()  # only the DiT run logs per-bucket losses
    np.testing.assert_allclose(bucket_line.get_xdata(), [0.25, 0.75])  # bucket centres of K = 2
    # Each bucket's last smoothed value: (0.5·(0.5·0.5·x1 + 0.5·x2) + 0.5·x3) / 0.875.
    np.testing.assert_allclose(bucket_line.get_ydata(),
                               [(0.05 + 0.05 + 0.05) / 0.875, (0.025 + 0.025 + 0.025) / 0.875])
    assert "step 300" in bucket_ax.get_title()
    for ax in (loss_ax, fd_ax, acc_ax, bucket_ax):
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    # By default a series of fewer than 20 logged values is drawn as logged.
    (default_ax,) = [ax for ax in curves.plot_runs([two_runs[0]], ["loss"]).axes
                     if ax.get_visible()]
    assert [list(ln.get_ydata()) for ln in default_ax.get_lines()] == [[1.0, 2.0, 3.0]]


def test_curves_average_seeds_into_one_line(tmp_path):
    runs = [write_run(tmp_path / "dtr" / f"seed{s}",
                      [{"step": 100, "eval/digits_fd": 1.0 + s},
                       {"step": 200, "eval/digits_fd": 3.0 * s}])
            for s in range(3)]
    fig = curves.plot_runs(runs, ["fd"])
    (ax,) = [a for a in fig.axes if a.get_visible()]
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), [2.0, 3.0])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "dtr (mean of 3 seeds, range shaded)"]
    assert len(ax.collections) == 1  # the min-max band


def test_curves_cli_writes_the_png_and_refuses_bad_input(two_runs, tmp_path, capsys):
    out = str(tmp_path / "cmp.png")
    assert curves.main([*two_runs, "--metric=loss,fd", f"--out={out}"]) == out
    width, height = png_size(out)
    assert 900 <= width <= 1400 and 400 <= height <= 800
    with pytest.raises(SystemExit, match=r"no metrics.jsonl"):
        curves.main([two_runs[0], str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as e:
        curves.main([*two_runs, "--metric=fid"])
    message = str(e.value)
    assert "'fid'" in message and "fd, accuracy, loss_t" in message and "steps_per_sec" in message
    with pytest.raises(UserError, match="2 names for 1 runs"):
        curves.plot_runs([two_runs[0]], names=["a", "b"])
