"""This project's train step against the official PyTorch DiT's, alternating in one process.

    python benchmarks/vs_pytorch.py --official_dit=/path/to/facebookresearch/DiT \
        [--models=DiT-S/2,DiT-B/2 --batch=8 --rounds=3 --steps=5]

Both sides do the same work per step: DiT-{S,B,...}/2 on a batch of 32×32×4 latents with
1000 classes, a uniformly drawn timestep per sample, the IDDPM hybrid loss (mse + vb, learned
sigma, linear schedule, T = 1000), label dropout 0.1, backward, AdamW (lr 1e-4, wd 0) and an
EMA update of every parameter (decay 0.9999). The official side is `models.py` and
`diffusion/` of a facebookresearch/DiT checkout, run as its `train.py` runs them; this side is
the jitted step of `configs/dit_*.py`. Each round times `--steps` steps of one, then of the
other (each after a 2 s pause, so that the other side's spinning worker threads are
asleep, and one untimed step); the reported figure of a round is the median step
time, and the ratio is ours / official (below 1 = this project is faster).

torch and timm are the user's (`pip install torch timm`), never a dependency of the package.
timm imports torchvision at import time only for its data transforms and frozen batch norm,
which DiT does not use; without torchvision installed, those imports get empty stand-ins so
that timm's real PatchEmbed / Attention / Mlp load. The output says which was used.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import platform
import statistics
import sys
import time
import types

from absl import app, flags

flags.DEFINE_string("official_dit", None, "A checkout of facebookresearch/DiT.")
flags.DEFINE_list("models", ["DiT-S/2", "DiT-B/2"], "Models to compare.")
flags.DEFINE_integer("batch", 8, "Images per step.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
flags.DEFINE_integer("steps", 5, "Timed steps per side and round.")
flags.DEFINE_string("out", "", "Optional JSON file for the result.")
FLAGS = flags.FLAGS

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {"S": "dit_s.py", "B": "dit_b.py", "L": "dit_l.py", "XL": "dit_xl.py"}


class _Placeholder(type):
    """A class whose every attribute is another placeholder class (enum members included)."""

    def __getattr__(cls, attr):
        return _placeholder(attr)


def _placeholder(attr: str):
    if attr.startswith("__"):  # module and class protocol lookups (__file__, ...) stay absent
        raise AttributeError(attr)
    return _Placeholder(attr, (), {})


class _EmptyModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of `prefix.*` succeed with modules whose every attribute is a placeholder."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def find_spec(self, name, path=None, target=None):
        if name == self.prefix or name.startswith(self.prefix + "."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _placeholder
        return module

    def exec_module(self, module):
        pass


def import_official(path: str):
    """(DiT_models, create_diffusion, timm description) from a facebookresearch/DiT checkout."""
    if not os.path.isfile(os.path.join(path, "models.py")):
        raise SystemExit(f"error: --official_dit={path!r} has no models.py; pass a checkout of "
                         "facebookresearch/DiT.")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("error: torch is not installed; pip install torch timm.") from None
    timm_note = "timm with torchvision"
    try:
        import torchvision  # noqa: F401
    except ImportError:
        sys.meta_path.insert(0, _EmptyModules("torchvision"))
        timm_note = "timm with torchvision stand-ins (torchvision not installed)"
    try:
        import timm
    except ImportError:
        raise SystemExit("error: timm is not installed; pip install timm.") from None
    sys.path.insert(0, path)
    from diffusion import create_diffusion
    from models import DiT_models
    return DiT_models, create_diffusion, f"{timm_note} {timm.__version__}"


def official_step(DiT_models, create_diffusion, name: str, batch: int):
    """A closure doing one official training step on a fixed batch (as train.py does)."""
    import copy

    import torch
    torch.manual_seed(0)
    model = DiT_models[name](input_size=32, num_classes=1000)
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    diffusion = create_diffusion(timestep_respacing="")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    x = torch.randn(batch, 4, 32, 32)
    y = torch.randint(0, 1000, (batch,))
    model.train()

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (batch,))
        loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(0.9999).add_(p.detach(), alpha=1 - 0.9999)
        return loss.item()

    return step, sum(p.numel() for p in model.parameters())


def our_step(name: str, batch: int):
    import flax.linen as nn
    import jax

    sys.path.insert(0, HERE)
    from synthetic_step import synthetic_step
    from switch_dit_jax import parallel
    from switch_dit_jax.config_base import load_config
    from switch_dit_jax.train.state import count_params

    size = name.split("-")[1].split("/")[0]
    config = load_config(os.path.join(HERE, "..", "configs", CONFIGS[size]),
                         {"model.name": name, "train.global_batch_size": batch})
    fn, state, data, key, mesh, _ = synthetic_step(config)
    holder = {"state": state}

    def step():
        with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
            holder["state"], metrics = fn(holder["state"], data, key)
        return float(metrics["loss"])

    return step, count_params(state.params)


def timed(step, n: int) -> list[float]:
    # The other side's worker threads spin for a while after its last step (OpenMP, Eigen):
    # let them go to sleep first, so each side is timed on an idle machine, as in training.
    time.sleep(2.0)
    step()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def main(argv):
    del argv
    import jax
    import torch
    DiT_models, create_diffusion, timm_note = import_official(FLAGS.official_dit)
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores",
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "jax": jax.__version__, "jax_backend": jax.default_backend(), "timm": timm_note,
              "batch": FLAGS.batch, "models": {}}
    for name in FLAGS.models:
        sides = {"official": official_step(DiT_models, create_diffusion, name, FLAGS.batch),
                 "ours": our_step(name, FLAGS.batch)}
        for step, _ in sides.values():
            step()  # compile / allocate
        rounds = []
        for r in range(FLAGS.rounds):
            medians = {k: statistics.median(timed(s, FLAGS.steps)) for k, (s, _) in sides.items()}
            rounds.append(dict(medians, ratio=medians["ours"] / medians["official"]))
            print(f"{name} round {r}: official {medians['official']:.3f} s/step, ours "
                  f"{medians['ours']:.3f} s/step, ratio {rounds[-1]['ratio']:.3f}", flush=True)
        ratios = [r["ratio"] for r in rounds]
        result["models"][name] = {
            "params_official": sides["official"][1], "params_ours": sides["ours"][1],
            "official_s_per_step": statistics.median(r["official"] for r in rounds),
            "ours_s_per_step": statistics.median(r["ours"] for r in rounds),
            "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
        }
    print(json.dumps(result, indent=1))
    if FLAGS.out:
        with open(FLAGS.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    flags.mark_flag_as_required("official_dit")
    app.run(main)
