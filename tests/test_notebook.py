"""notebooks/sample.ipynb, executed headless (nbclient) against tiny checkpoints made here."""
import json
import os

import jax
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from PIL import Image

import test_train
from switch_dit_jax.models import build_model, convert, layers
from switch_dit_jax.train import loop

NOTEBOOK = os.path.join(test_train.ROOT, "notebooks", "sample.ipynb")
# Small enough for a 2-core CI machine; 2 devices so that sampling is really sharded.
FAST = dict(NUM_STEPS="4", SAMPLES_PER_CLASS="2", CLASSES="1,2,3", JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=2")


def execute(**env):
    """Runs every cell in a fresh kernel started in notebooks/, as Jupyter would."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute(env=dict(os.environ, **FAST, **env))
    return nb


def outputs(nb, output_type):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if o.output_type == output_type]


def text_of(nb):
    return "".join(o.get("text", "") for o in outputs(nb, "stream"))


def test_notebook_is_clean_and_valid():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")


def test_notebook_on_a_switch_dit_workdir(tmp_path):
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(test_train.tiny_config(**{
        "model.routing.kind": "switch", "train.num_steps": 2, "train.checkpoint_every": 2}),
        workdir)
    nb = execute(WORKDIR=workdir)

    text = text_of(nb)
    assert f"{workdir}: step 2, custom model, data digits" in text
    assert "6 samples in" in text and "(ddpm, 4 steps, CFG 2.0)" in text
    assert "no capacity over steps to show: model.ffn.kind='mlp'" in text
    pictures = [o for o in outputs(nb, "display_data") if "image/png" in o.data]
    assert len(pictures) == 3  # the grid, gate vs prior, denoising paths
    out_dir = os.path.join(workdir, "notebook")
    assert sorted(os.listdir(out_dir)) == ["denoising_paths.png", "gate_vs_prior.png",
                                           "samples.png"]
    # 3 classes as rows, 2 samples each, 8x8 digits enlarged 8 times with 1-pixel gaps.
    assert Image.open(os.path.join(out_dir, "samples.png")).size == (2 * 72 + 8, 3 * 72 + 8)


def _official_state_dict(model_config) -> dict:
    """A state dict with facebookresearch/DiT's names and shapes for `model_config`."""
    model = build_model(model_config)
    s = model.input_size
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), np.zeros((1, s, s, model.in_channels)), np.zeros((1,)),
        np.zeros((1,), np.int32)))["params"]
    rng = np.random.default_rng(0)
    state_dict = {"pos_embed": layers.sincos_pos_embed_2d(model.hidden_size,
                                                          model.grid_size)[None]}
    for key, (path, _) in convert.official_key_map(model.depth, model.num_classes).items():
        leaf = abstract
        for part in path:
            leaf = leaf[part]
        shape = tuple(getattr(leaf, "value", leaf).shape)
        if key == "x_embedder.proj.weight":
            shape = (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
        elif key.endswith(".weight") and "embedding_table" not in key:
            shape = shape[::-1]  # Flax kernel [in, out] -> torch weight [out, in]
        state_dict[key] = rng.normal(0, 0.02, shape).astype(np.float32)
    return state_dict


def test_notebook_on_converted_official_weights(tmp_path):
    """An imported checkpoint of latent-space DiT (4 channels) with no VAE: latent preview."""
    model_config = {"name": "custom", "depth": 1, "hidden_size": 32, "num_heads": 2,
                    "patch_size": 4, "input_size": 8, "in_channels": 4, "num_classes": 10}
    path = str(tmp_path / "DiT-tiny.npz")
    np.savez(path, **_official_state_dict(model_config))
    nb = execute(OFFICIAL_CHECKPOINT=path, OFFICIAL_MODEL=json.dumps(model_config),
                 WORKDIR=str(tmp_path / "absent"))
    text = text_of(nb)
    assert f"official weights {path}: custom" in text
    markdown = " ".join(o.data.get("text/markdown", "") for o in outputs(nb, "display_data"))
    assert "latent channels 0-2 (set VAE_WEIGHTS to decode them)" in markdown
    assert "no learned routing to show: model.routing.kind='none'" in text
    assert os.path.exists(str(tmp_path / "notebook" / "samples.png"))


def test_notebook_without_a_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(CellExecutionError) as err:
        execute(WORKDIR=str(tmp_path / "nothing"))
    assert "FileNotFoundError" in str(err.value)
    assert "has no checkpoints; train one first (python -m switch_dit_jax.main" in str(err.value)
