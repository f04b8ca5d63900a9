"""Diffusion transformers as multi-task learners: Switch-DiT, DTR and DiffMoE in JAX/Flax."""

__version__ = "0.1.0"
