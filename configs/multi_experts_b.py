"""Multi-experts baseline: member k of 4 DiT-B/2 denoisers, each trained only on its quarter
[k·T/4, (k+1)·T/4) of the timesteps, on ImageNet 256x256 SD latents, cosine schedule
(Switch-DiT Table A: 100K steps each, FID 18.01; DTR Table 6: 200K steps each,
--config.train.num_steps=200000, FID 9.48).

    python -m switch_dit_jax.main --config=configs/multi_experts_b.py:K --workdir=RUN/K  (K=0..3)
    python -m switch_dit_jax.multi_expert --config=configs/multi_experts_b.py \\
        --workdirs=RUN/0,RUN/1,RUN/2,RUN/3 --outdir=RUN/samples

Sampling hands each step to the member whose quarter holds t (CFG 1.5 on every channel, as
the Switch-DiT / DTR code).
"""
from switch_dit_jax.config_base import get_base_config
from switch_dit_jax.config_recipes import PAPER_CFG_SCALE

MEMBERS = 4


def get_config(member: str = "0"):
    if member not in [str(k) for k in range(MEMBERS)]:
        raise ValueError(f"unknown member {member!r}; use 0 .. {MEMBERS - 1}.")
    k = int(member)
    config = get_base_config()
    config.model.name = "DiT-B/2"
    config.data.name = "latents"
    config.diffusion.schedule = "cosine"
    t = config.diffusion.num_timesteps
    config.diffusion.t_range = (k * t // MEMBERS, (k + 1) * t // MEMBERS)
    config.train.num_steps = 100_000
    config.sample.cfg_scale = PAPER_CFG_SCALE
    return config
