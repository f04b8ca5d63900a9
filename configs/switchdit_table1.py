"""Switch-DiT Table 1 (design space, Switch-DiT-B on FFHQ 256x256, unconditional): one row per
config string, e.g.

    python -m switch_dit_jax.main --config=configs/switchdit_table1.py:gate_noisy_ldp ...

Rows (paper FID-10K): gate_plain 9.68, gate_noisy 8.26, gate_noisy_load 16.78,
gate_noisy_ldp 7.59, gate_ldp 7.12 (= the final design); integration rows (all with L_dp):
direct 8.15, mask 7.98, mask_skip 7.77, mask_init 7.53, mask_skip_init 7.12; (M, k) rows:
m3_k1 8.20, m4_k2 7.83, m2_k2 9.24, m4_k3 7.05, m3_k2 7.12.
"""
from switch_dit_jax.config_base import get_base_config

ROWS = {
    # Timestep-based gating network: noisy top-k gating / load-balancing loss / L_dp.
    "gate_plain": dict(noisy=False, load=False, ldp=False),
    "gate_noisy": dict(noisy=True, load=False, ldp=False),
    "gate_noisy_load": dict(noisy=True, load=True, ldp=False),
    "gate_noisy_ldp": dict(noisy=True, load=False, ldp=True),
    "gate_ldp": dict(noisy=False, load=False, ldp=True),
    # SMoE layer integration.
    "direct": dict(integration="direct"),
    "mask": dict(integration="mask"),
    "mask_skip": dict(integration="mask_skip"),
    "mask_init": dict(integration="mask_init"),
    "mask_skip_init": dict(integration="mask_skip_init"),
    # Number of experts M and top-k.
    "m3_k1": dict(m=3, k=1),
    "m4_k2": dict(m=4, k=2),
    "m2_k2": dict(m=2, k=2),
    "m4_k3": dict(m=4, k=3),
    "m3_k2": dict(m=3, k=2),
}


def get_config(row: str = "mask_skip_init"):
    if row not in ROWS:
        raise ValueError(f"unknown Table 1 row {row!r}; use one of {sorted(ROWS)}.")
    r = ROWS[row]
    config = get_base_config()
    config.model.name = "DiT-B/2"
    config.model.num_classes = 1          # FFHQ: unconditional
    config.model.class_dropout_prob = 0.0
    config.data.name = "latents"          # FFHQ-256 latents: --config.data.dir=...
    config.diffusion.schedule = "cosine"
    config.model.routing.kind = "switch"
    config.model.routing.integration = r.get("integration", "mask_skip_init")
    config.model.routing.num_experts = r.get("m", 3)
    config.model.routing.top_k = r.get("k", 2)
    config.model.routing.noisy_gating = r.get("noisy", False)
    config.loss.load_balance_weight = 0.01 if r.get("load", False) else 0.0
    config.loss.prior_weight = 1.0 if r.get("ldp", True) else 0.0
    config.sample.cfg_scale = 1.0         # unconditional
    return config
