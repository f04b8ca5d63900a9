"""The on-device assignment solver (models/assignment.py) of the Switch-DiT prior loss.

Exact against scipy's linear_sum_assignment (the test reference only) on > 1000 cost matrices
of the Switch-DiT sizes N·M = 36, 72, 84, heavily tied ones included, and against brute force
for n ≤ 7; deterministic; and the compiled Switch-DiT train step holds no host callback.
"""
import itertools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from switch_dit_jax.models import switch
from switch_dit_jax.models.assignment import optimal_assignment

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "quickstart.py")
T = 1000

# A whole stack in one call, one compilation per shape. lax.map solves the matrices one after
# the other inside the program; a vmapped while loop would run every matrix for as many
# iterations as the slowest one needs (and both sides of each lax.cond), ~10x slower here.
solve_stack = jax.jit(lambda costs: jax.lax.map(optimal_assignment, costs))
solve_vmapped = jax.jit(jax.vmap(optimal_assignment))
switch_costs = jax.jit(jax.vmap(switch.matching_cost))


def top_k_maps(rng, count, depth, m_exp=3, k=2, tasks=T):
    """Random binary w_gate stacks [count, T, N·M]: k of M experts per block and timestep."""
    x = rng.random((count, tasks, depth, m_exp))
    return (x >= np.sort(x, -1)[..., m_exp - k, None]).reshape(count, tasks, -1)


def piecewise_maps(rng, count, depth, segments, m_exp=3, k=2, tasks=T):
    """Gates that switch experts only at a few timesteps: many equal gate columns."""
    out = []
    for _ in range(count):
        cuts = np.sort(rng.choice(np.arange(1, tasks), segments - 1, replace=False))
        seg = np.searchsorted(cuts, np.arange(tasks), side="right")
        out.append(top_k_maps(rng, 1, depth, m_exp, k, segments)[0][seg])
    return np.stack(out)


def near_prior_maps(rng, count, prior, depth, flip, m_exp=3, k=2):
    """A trained router: the prior with its columns permuted, a fraction of timesteps redrawn."""
    out = []
    for _ in range(count):
        w = prior[:, rng.permutation(prior.shape[1])].copy()
        redo = rng.random(prior.shape[0]) < flip
        if redo.any():
            w[redo] = top_k_maps(rng, 1, depth, m_exp, k, int(redo.sum()))[0]
        out.append(w)
    return np.stack(out)


def tied_costs(rng, count, n):
    """Generic integer costs: wide and tiny ranges, repeated columns, repeated rows and columns,
    near-ties."""
    out = []
    for i in range(count):
        kind = i % 6
        if kind == 0:
            c = rng.integers(0, T + 1, (n, n))
        elif kind == 1:
            c = rng.integers(0, 2, (n, n))
        elif kind == 2:
            c = rng.integers(0, 4, (n, n))
        elif kind == 3:  # few distinct columns, each repeated many times
            c = rng.integers(0, 50, (n, 5))[:, rng.integers(0, 5, n)]
        elif kind == 4:  # repeated rows and columns
            c = rng.integers(0, 20, (4, 4))[rng.integers(0, 4, n)][:, rng.integers(0, 4, n)]
        else:  # rank one plus small noise: long chains of near-ties
            c = (np.outer(rng.integers(0, 30, n), rng.integers(0, 30, n)) // 30
                 + rng.integers(0, 2, (n, n)))
        out.append(c)
    return np.stack(out).astype(np.float32)


def switch_dit_costs(rng, depth, count):
    """matching_cost(w_gate, w_prior[:, perm]) as the prior loss builds it, with the real prior
    map of N blocks, M = 3, k = 2, and gate maps from untrained to trained routers."""
    prior = switch.prior_activation_map(depth, 3, 2, T, 4.0).astype(np.float32)
    n = prior.shape[1]
    quarter = count // 4
    gates = np.concatenate([
        top_k_maps(rng, quarter, depth),
        piecewise_maps(rng, quarter, depth, segments=3),
        near_prior_maps(rng, quarter, prior, depth, flip=0.05),
        near_prior_maps(rng, count - 3 * quarter, prior, depth, flip=0.0),
    ]).astype(np.float32)
    priors = np.stack([prior[:, rng.permutation(n)] for _ in range(count)])
    return np.asarray(switch_costs(jnp.asarray(gates), jnp.asarray(priors)))


def assert_optimal(costs, matches):
    for c, m in zip(costs, np.asarray(matches)):
        n = c.shape[0]
        np.testing.assert_array_equal(np.sort(m), np.arange(n))  # a permutation
        rows, cols = linear_sum_assignment(c.astype(np.float64))
        assert c[np.arange(n), m].astype(np.float64).sum() == c[rows, cols].astype(np.float64).sum()


def sized_costs(depth, count):
    """Half built like Switch-DiT's costs, half generic tied ones; the same for the same args."""
    rng = np.random.default_rng(depth)
    return np.concatenate([switch_dit_costs(rng, depth, count // 2),
                           tied_costs(rng, count - count // 2, 3 * depth)])


@pytest.mark.parametrize("depth,count", [(12, 420), (24, 300), (28, 300)])
def test_optimal_on_switch_dit_sized_costs(depth, count):
    """1020 matrices in all, of sizes N·M = 36 (Switch-DiT-S/B), 72 (L) and 84 (XL)."""
    costs = sized_costs(depth, count)
    assert np.all(costs == np.round(costs)) and costs.max() <= T  # the solver's regime
    matches = np.asarray(solve_stack(jnp.asarray(costs)))
    assert matches.dtype == np.int32 and matches.shape == (count, 3 * depth)
    assert_optimal(costs, matches)


@pytest.mark.parametrize("n", range(2, 8))
def test_optimal_against_brute_force(n):
    rng = np.random.default_rng(n)
    costs = np.concatenate([rng.integers(0, 3, (20, n, n)), rng.integers(0, 100, (20, n, n)),
                            np.zeros((1, n, n))]).astype(np.float32)
    perms = np.array(list(itertools.permutations(range(n))))
    best = costs[:, np.arange(n), perms].sum(-1).min(-1)  # [matrices]
    matches = np.asarray(solve_stack(jnp.asarray(costs)))
    np.testing.assert_array_equal(np.sort(matches, -1), np.broadcast_to(np.arange(n), (41, n)))
    np.testing.assert_array_equal(np.take_along_axis(costs, matches[:, :, None], 2).sum((1, 2)),
                                  best)


def test_deterministic_and_batching_invariant():
    """Same input, same output: twice, and alone (as in the train step), mapped or vmapped."""
    costs = jnp.asarray(sized_costs(28, 300))  # the n = 84 test's stack: no new compilation
    first = np.asarray(solve_stack(costs))
    np.testing.assert_array_equal(first, np.asarray(solve_stack(costs)))
    # Every kind: untrained, piecewise, near-prior and prior gates, then the six tied kinds.
    picked = np.array([0, 40, 80, 120, 150, 151, 152, 153, 154, 155])
    single = jax.jit(optimal_assignment)
    for i in picked:
        np.testing.assert_array_equal(np.asarray(single(costs[i])), first[i])
    np.testing.assert_array_equal(np.asarray(solve_vmapped(costs[picked])), first[picked])


def test_dtypes_and_shape_checks():
    cost = np.array([[4, 1, 3], [2, 0, 5], [3, 2, 2]])
    solve = jax.jit(optimal_assignment)
    for dtype in (np.int32, np.float32):
        np.testing.assert_array_equal(solve(jnp.asarray(cost, dtype)), [1, 0, 2])
    with pytest.raises(ValueError, match="square"):
        optimal_assignment(jnp.zeros((3, 4)))


# Custom-call targets in StableHLO (`custom_call @target`) and HLO (`custom_call_target="..."`).
CUSTOM_CALL = re.compile(r'custom_call @([\w.]+)|custom_call_target="([^"]+)"')
# Host transfers: StableHLO `stablehlo.send` ..., HLO `= ... send(`, `recv-done(`, ...
TRANSFER = re.compile(r"stablehlo\.(send|recv|infeed|outfeed)\b|\s(send|recv|infeed|outfeed)"
                      r"(-done)?\(|is_host_transfer=true")


def host_round_trips(text: str) -> list[str]:
    """Ops of an HLO / StableHLO module that call back to the host or transfer to it.

    jax.pure_callback / io_callback lower to a custom call `xla_ffi_python_cpu_callback`
    (`..._gpu_callback` on GPU, `xla_python_*_callback` in older jaxlibs); host transfers to
    send/recv (is_host_transfer), infeed or outfeed. Only ops are read: metadata such as the
    names of Python functions (this test's own contains "callback") is not.
    """
    found = []
    for line in text.splitlines():
        targets = [a or b for a, b in CUSTOM_CALL.findall(line)]
        found += [t for t in targets if re.search("callback|python|host", t, re.IGNORECASE)]
        if TRANSFER.search(line):
            found.append(line.strip()[:160])
    return found


def test_host_round_trips_detects_a_pure_callback():
    def with_callback(x):
        return jax.pure_callback(lambda a: np.asarray(a) + 1, jax.ShapeDtypeStruct((3,), x.dtype),
                                 x)

    lowered = jax.jit(with_callback).lower(jnp.zeros(3))
    assert host_round_trips(lowered.as_text())
    assert host_round_trips(lowered.compile().as_text())


def test_switch_dit_train_step_has_no_host_callback():
    """The sharded train step with the prior loss, built as benchmarks/synthetic_step.py does."""
    from switch_dit_jax import parallel
    from switch_dit_jax.config_base import load_config
    from switch_dit_jax.models import build_model
    from switch_dit_jax.train.state import make_optimizer, state_shardings
    from switch_dit_jax.train.step import make_diffusion, make_train_step

    config = load_config(QUICKSTART, {"model.routing.kind": "switch"})
    assert config.loss.prior_weight > 0
    mesh = parallel.make_mesh(config.mesh)
    model = build_model(config.model)
    tx = make_optimizer(config.train, config.loss)
    abstract_state, shardings = state_shardings(model, tx, mesh, config.loss)
    b, s, c = config.train.global_batch_size, model.input_size, model.in_channels
    batch = {"image": jax.ShapeDtypeStruct((b, s, s, c), jnp.float32),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
    step = jax.jit(make_train_step(model, make_diffusion(config), tx, config),
                   in_shardings=(shardings, parallel.batch_sharding(mesh),
                                 parallel.replicated(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)))
    lowered = step.lower(abstract_state, batch, jax.random.PRNGKey(1))
    # On the scipy callback this step had, the first check failed on the lowered
    # `custom_call @xla_ffi_python_cpu_callback` and the compiled `custom-call` to it.
    assert host_round_trips(lowered.as_text()) == []
    assert host_round_trips(lowered.compile().as_text()) == []
