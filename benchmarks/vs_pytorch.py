"""This project's train step against the official PyTorch DiT's, alternating in one process.

    python benchmarks/vs_pytorch.py --official_dit=/path/to/facebookresearch/DiT \
        [--models=DiT-S/2,DiT-B/2 --batch=8 --rounds=3 --steps=5] [--ab_env=NAME=VALUE ...] \
        [--attention_share]

Both sides do the same work per step: DiT-{S,B,...}/2 on a batch of 32×32×4 latents with
1000 classes, a uniformly drawn timestep per sample, the IDDPM hybrid loss (mse + vb, learned
sigma, linear schedule, T = 1000), label dropout 0.1, backward, AdamW (lr 1e-4, wd 0) and an
EMA update of every parameter (decay 0.9999). The official side is `models.py` and
`diffusion/` of a facebookresearch/DiT checkout, run as its `train.py` runs them; this side is
the jitted step of `configs/dit_*.py`. Each side lives in its own worker process (in one
process, the two libraries' thread pools and allocators slow each other down by ~10 %); both
are built and warmed up first, then each round times `--steps` steps of one, then of the other
(each after a 1 s pause and one untimed step, so that the other side's threads are idle). The
figure of a round is its median step time; the ratio is ours / official (below 1 = this
project is faster). Each round also reports the minor page faults per step of each side.

`--attention_share` adds two sides, each step with its attention kernel replaced by a stand-in
that returns v (plus 0·q + 0·k, so that every other op and gradient keeps its shape): torch's
`F.scaled_dot_product_attention` on the official side, `attention.multi_head_attention` on
ours. Each round then also reports what attention costs per step on each side, the difference
of the two medians, and the ratio of the rest of the step.

Each `--ab_env` (repeatable) adds a side: our step again, with one variable set in its
environment, e.g. SWITCH_DIT_HOST_MALLOC=0 (malloc left untuned) or
PYTHONPATH=/path/to/an/older/checkout (that version of the package), timed in the same
alternation.

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
flags.DEFINE_multi_string("ab_env", [], "Also time our step with this NAME=VALUE in its "
                          "environment (e.g. SWITCH_DIT_HOST_MALLOC=0), as one more side, "
                          "alternating too; repeatable.")
flags.DEFINE_bool("attention_share", False, "Also time both steps with attention replaced by "
                  "a stand-in, to report attention's cost per step on each side.")
flags.DEFINE_bool("without_attention", False, "Internal: the worker's step without attention.")
flags.DEFINE_enum("worker", None, ["official", "ours"], "Internal: run one side's worker.")
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
    from switch_dit_jax import cpu_tuning, parallel
    from switch_dit_jax.config_base import load_config
    from switch_dit_jax.train.state import count_params

    size = name.split("-")[1].split("/")[0]
    config = load_config(os.path.join(HERE, "..", "configs", CONFIGS[size]),
                         {"model.name": name, "train.global_batch_size": batch})
    fn, state, data, key, mesh, _ = synthetic_step(config)
    fn = cpu_tuning.lazily_compiled(fn)
    holder = {"state": state}

    def step():
        with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
            holder["state"], metrics = fn(holder["state"], data, key)
        return float(metrics["loss"])

    return step, count_params(state.params)


def timed(step, n: int) -> dict:
    """Step times, and the minor page faults per step (a sign of memory given back to the
    kernel and touched anew each step)."""
    import resource
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"times": times, "faults_per_step": faults / n}


def _attention_stand_in(q, k, v, *args, **kwargs):
    """v, with q and k kept in the graph at the price of two elementwise ops."""
    return v + 0 * q + 0 * k


def remove_attention(side: str) -> None:
    """Replaces the side's attention kernel by `_attention_stand_in` (see the docstring)."""
    if side == "official":
        import torch.nn.functional
        torch.nn.functional.scaled_dot_product_attention = _attention_stand_in
    else:
        from switch_dit_jax.models import attention
        attention.multi_head_attention = _attention_stand_in


def worker(side: str, name: str, batch: int, official_dit: str,
           without_attention: bool = False) -> None:
    """One side in its own process: build and warm up the step, then time `n` steps whenever
    the parent writes `n` on stdin, answering with a JSON line of step times."""
    if without_attention:
        remove_attention(side)
    if side == "official":
        DiT_models, create_diffusion, note = import_official(official_dit)
        step, params = official_step(DiT_models, create_diffusion, name, batch)
    else:
        step, params = our_step(name, batch)
        note = ""
    step()
    print(json.dumps({"ready": True, "params": params, "note": note}), flush=True)
    for line in sys.stdin:
        # The other side's worker threads may still spin for a moment (OpenMP, Eigen): let
        # them settle so that each side is timed on an idle machine, as in training.
        time.sleep(1.0)
        step()
        print(json.dumps(timed(step, int(line))), flush=True)


NO_ATTENTION = "[no attention]"


def attention_share(medians: dict) -> dict:
    """Attention's ms per step on each side (step minus the step without it), and the ratio
    ours / official of the steps without it."""
    return {"attention_ms_per_step": {
                k: 1e3 * (medians[k] - medians[k + NO_ATTENTION]) for k in ("official", "ours")},
            "ratio_without_attention": (medians["ours" + NO_ATTENTION]
                                        / medians["official" + NO_ATTENTION])}


def describe(round_: dict, timings: dict) -> str:
    """One round as a line: each side's median and page faults, the ratios, attention's share."""
    text = ", ".join(f"{k} {m:.3f} s/step ({timings[k]['faults_per_step']:.0f} page faults/step)"
                     for k, m in round_["s_per_step"].items())
    text += "; ours / official " + ", ".join(f"{k} {v:.3f}" for k, v in round_["ratio"].items())
    if "attention_ms_per_step" in round_:
        ms = round_["attention_ms_per_step"]
        text += (f"; attention {ms['official']:.0f} ms/step official, {ms['ours']:.0f} ours; "
                 f"the rest ours / official {round_['ratio_without_attention']:.3f}")
    return text


class Side:
    def __init__(self, side: str, name: str, env: dict | None = None,
                 without_attention: bool = False):
        import subprocess
        cmd = [sys.executable, os.path.abspath(__file__), f"--worker={side}", f"--models={name}",
               f"--batch={FLAGS.batch}", f"--official_dit={FLAGS.official_dit}",
               f"--without_attention={without_attention}"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=dict(os.environ, **(env or {})))
        self.name = f"{side} {name}" + (f" {env}" if env else "")
        self.info = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: the {self.name} worker died; see its output above.")
        return json.loads(line)

    def time(self, n: int) -> dict:
        try:
            self.proc.stdin.write(f"{n}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise SystemExit(f"error: the {self.name} worker died (out of memory? each side "
                             "holds its own model, and --attention_share and every --ab_env "
                             "add sides); see its output above.") from None
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def main(argv):
    del argv
    if FLAGS.worker:
        return worker(FLAGS.worker, FLAGS.models[0], FLAGS.batch, FLAGS.official_dit,
                      FLAGS.without_attention)
    import jax
    import torch
    import_official(FLAGS.official_dit)  # fail early, with one sentence
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores",
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "jax": jax.__version__, "jax_backend": jax.default_backend(),
              "batch": FLAGS.batch, "models": {}}
    for ab in FLAGS.ab_env:
        if "=" not in ab:
            raise SystemExit(f"error: --ab_env={ab!r} is not NAME=VALUE.")
    for name in FLAGS.models:
        sides = {"official": Side("official", name), "ours": Side("ours", name)}
        for ab in FLAGS.ab_env:
            sides[f"ours[{ab}]"] = Side("ours", name, dict([ab.split("=", 1)]))
        if FLAGS.attention_share:
            for side in ("official", "ours"):
                sides[f"{side}{NO_ATTENTION}"] = Side(side, name, without_attention=True)
        result["timm"] = sides["official"].info["note"]
        rounds = []
        for r in range(FLAGS.rounds):
            timings = {k: s.time(FLAGS.steps) for k, s in sides.items()}
            medians = {k: statistics.median(t["times"]) for k, t in timings.items()}
            rounds.append({"s_per_step": medians,
                           "faults_per_step": {k: t["faults_per_step"] for k, t in timings.items()},
                           "ratio": {k: m / medians["official"] for k, m in medians.items()
                                     if k != "official" and NO_ATTENTION not in k}})
            if FLAGS.attention_share:
                rounds[-1].update(attention_share(medians))
            print(f"{name} round {r}: " + describe(rounds[-1], timings), flush=True)
        for s in sides.values():
            s.close()
        entry = {"params_official": sides["official"].info["params"],
                 "params_ours": sides["ours"].info["params"], "rounds": rounds}
        for k in sides:
            entry[f"{k}_s_per_step"] = statistics.median(r["s_per_step"][k] for r in rounds)
            # "ours" -> ratio_*, "ours[NAME=VALUE]" -> ratio[NAME=VALUE]_*
            if k != "official" and NO_ATTENTION not in k:
                ratios = [r["ratio"][k] for r in rounds]
                entry[f"ratio{k.removeprefix('ours')}_median"] = statistics.median(ratios)
                entry[f"ratio{k.removeprefix('ours')}_range"] = [min(ratios), max(ratios)]
        if FLAGS.attention_share:
            for k in ("official", "ours"):
                entry[f"attention_ms_per_step_{k}"] = statistics.median(
                    r["attention_ms_per_step"][k] for r in rounds)
            entry["ratio_without_attention_median"] = statistics.median(
                r["ratio_without_attention"] for r in rounds)
        result["models"][name] = entry
    print(json.dumps(result, indent=1))
    if FLAGS.out:
        with open(FLAGS.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    flags.mark_flag_as_required("official_dit")
    app.run(main)
