"""Exact linear assignment (minimum-cost perfect matching of a square cost matrix) in JAX.

Switch-DiT solves one N·M x N·M assignment (N·M ≤ 84) inside every training step. Solving it
on the device keeps the step one XLA program (DESIGN.md §4: nothing leaves the device inside a
step); a host callback would stall the accelerator pipeline and every host of a pod.

The method is the Hungarian algorithm in its shortest-augmenting-path form (Jonker-Volgenant):
start from a feasible dual (u, v), c[i, j] - u[i] - v[j] ≥ 0, and a greedy matching on its
tight (zero reduced cost) edges; then, for each free row, grow a Dijkstra tree over reduced
costs until it reaches a free column, update the duals so that the tree stays tight, and flip
the path. Duals stay feasible and matched edges tight throughout, so the final perfect matching
is optimal (complementary slackness). At most n phases (one per free row), each scanning every
row at most once with O(n) vector work: O(n^3), as in the textbook algorithm (rows scanned
together share one masked [n, n] pass instead). Static shapes, `lax.while_loop`s, no host.

Columns at the current Dijkstra distance are settled all at once, not one per iteration: with
the heavy ties of Switch-DiT's costs (the prior map makes many columns equal) a phase takes a
handful of iterations instead of up to n. On a CPU the loops' cost is mostly per-op overhead,
so the inner loops avoid argmin/argmax and keep the number of ops per iteration small.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _first(mask: jax.Array, axis: int = -1) -> jax.Array:
    """Index of the first True along `axis` (its size if none).

    A select and a min: XLA:CPU lowers argmin/argmax to a variadic reduce that is >10x slower
    (about 60 us against 5 us on [84, 84] on this project's CPU), in the solver's inner loops.
    """
    size = mask.shape[axis]
    shape = [1] * mask.ndim
    shape[axis] = size
    iota = jnp.arange(size, dtype=jnp.int32).reshape(shape)
    return jnp.min(jnp.where(mask, iota, size), axis=axis)


def _greedy_tight_matching(tight: jax.Array):
    """A maximal matching on the tight edges by rounds of parallel proposals.

    Each free row proposes to a free tight column; each column takes its lowest-index proposer.
    Every round matches at least one pair or stops, so it ends in ≤ n rounds (a few in
    practice). The more pairs it matches, the fewer augmenting phases follow.
    """
    n = tight.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)
    shift = (idx[None, :] - idx[:, None]) % n

    def body(state):
        row_col, col_row, _ = state
        avail = tight & (row_col < 0)[:, None] & (col_row < 0)[None, :]
        # Row i looks from column i on (cyclically), so rows with equal tight sets, common
        # under heavy ties, propose to different columns instead of all to the first one.
        offset = jnp.min(jnp.where(avail, shift, n), axis=1)
        choice = jnp.where(offset < n, (offset + idx) % n, n)
        proposals = choice[:, None] == idx[None, :]
        winner = _first(proposals, axis=0)
        got = winner < n
        accepted = (choice < n) & (winner[jnp.minimum(choice, n - 1)] == idx)
        return (jnp.where(accepted, choice, row_col), jnp.where(got, winner, col_row),
                got.any())

    free = jnp.full((n,), -1, jnp.int32)
    row_col, col_row, _ = jax.lax.while_loop(lambda s: s[2], body, (free, free, jnp.bool_(True)))
    return row_col, col_row


def _augment_from(c, u, v, row_col, col_row, root):
    """One shortest-augmenting-path phase from the free row `root`; returns the new state.

    Dijkstra over reduced costs that settles every column at the current minimum distance at
    once (all of them are final: reduced costs are ≥ 0), then scans all of their rows together
    (one row: a row gather; several: a masked [n, n] min). Heavy ties thus cost one iteration
    per distance level, not one per column. Each iteration settles ≥ 1 column, so ≤ n of them.
    """
    n = c.shape[0]
    inf = jnp.asarray(jnp.inf, c.dtype)

    def search_body(s):
        u, v, minv, col_batch, row_batch, used_col, used_row, new_rows, it, _ = s
        r = _first(new_rows)
        one = ~jnp.any(new_rows & (jnp.arange(n) != r))
        # Most levels of a random cost's search hold one row: then a row beats the [n, n] pass.
        best = jax.lax.cond(
            one, lambda: c[r] - u[r] - v,
            lambda: jnp.min(jnp.where(new_rows[:, None], c - u[:, None] - v[None, :], inf),
                            axis=0))
        better = (best < minv) & ~used_col
        minv = jnp.where(better, best, minv)
        # Which batch of rows gave each column its distance; the row itself is looked up only
        # for the few columns on the augmenting path (an argmin here would dominate the loop).
        col_batch = jnp.where(better, it, col_batch)
        row_batch = jnp.where(new_rows, it, row_batch)
        open_minv = jnp.where(used_col, inf, minv)
        delta = jnp.min(open_minv)
        # The dual step keeps the tree's edges tight and every reduced cost ≥ 0.
        u = u + jnp.where(used_row, delta, 0)
        v = v - jnp.where(used_col, delta, 0)
        minv = minv - delta
        # x - y == 0 exactly iff x == y: these columns are now at reduced distance 0.
        settled = ~used_col & (open_minv == delta)
        end = _first(settled & (col_row < 0))
        new_rows = settled[jnp.maximum(row_col, 0)] & (row_col >= 0)
        return (u, v, minv, col_batch, row_batch, used_col | settled, used_row | new_rows,
                new_rows, it + 1, end)

    start = jnp.arange(n) == root
    minus = jnp.full((n,), -1, jnp.int32)
    state = (u, v, jnp.full((n,), inf), minus, minus, jnp.zeros((n,), bool), start, start,
             jnp.int32(0), jnp.int32(n))
    # The bound on `it` only guards against non-finite costs; finite ones end by themselves.
    u, v, _, col_batch, row_batch, _, _, _, _, end = jax.lax.while_loop(
        lambda s: (s[-1] == n) & (s[-2] <= n), search_body, state)

    def flip(s):
        row_col, col_row, j, steps = s
        # Rows scanned together received the same dual steps since, so the one that reached
        # column j is still a minimiser of its final reduced cost within that batch, and that
        # edge is tight now. Rows enter a batch only after their column was settled, so the
        # chain runs back in time to the root.
        batch = row_batch == col_batch[j]
        reduced = jnp.where(batch, c[:, j] - u - v[j], inf)
        r = _first(batch & (reduced == jnp.min(reduced)))
        prev = row_col[r]  # -1 once the root (a free row) is reached
        return row_col.at[r].set(j), col_row.at[j].set(r), prev, steps + 1

    row_col, col_row, _, _ = jax.lax.while_loop(
        lambda s: (s[2] >= 0) & (s[2] < n) & (s[3] < n), flip,
        (row_col, col_row, end, jnp.int32(0)))
    return u, v, row_col, col_row


@jax.jit
def optimal_assignment(cost: jax.Array) -> jax.Array:
    """Column out[i] assigned to row i, minimising Σ_i cost[i, out[i]] (exact); int32[n].

    cost: [n, n], finite. Deterministic (every tie goes by index), jit- and vmap-able, no host
    callback; inside a sharded step a replicated cost gives the same answer on every device.

    Exactness: the arithmetic is float32 (float64 if given). For integer costs every value it
    forms is an integer bounded as follows, inside float32's exact range (|x| ≤ 2^24), so no
    operation rounds and the equality tests are exact. With lo ≤ c ≤ hi and R = hi - lo: u
    starts at the row minima (in [lo, hi]) and only grows, v starts at the column minima of
    c - u (in [0, R]) and only shrinks, and only settled columns, which are matched, ever move.
    While a row is free some column f is too, still at v[f] ≥ 0, so u[r] ≤ c[r, f] - v[f] ≤ hi;
    matched edges are tight, so v ≥ lo - hi. Hence u ∈ [lo, hi], v ∈ [-R, R], reduced costs
    ∈ [0, 2R], and every intermediate is bounded by max(|lo|, |hi|) + 2R: ≤ 3000 for
    Switch-DiT's costs, integers in [0, T] with T = 1000.
    Non-integer costs are solved up to float rounding.
    """
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"optimal_assignment needs a square cost matrix, got {cost.shape}.")
    dtype = cost.dtype if jnp.issubdtype(cost.dtype, jnp.floating) and \
        jnp.finfo(cost.dtype).bits >= 32 else jnp.float32
    c = cost.astype(dtype)
    u = jnp.min(c, axis=1)
    v = jnp.min(c - u[:, None], axis=0)
    row_col, col_row = _greedy_tight_matching(c - u[:, None] - v[None, :] == 0)

    def body(s):
        u, v, row_col, col_row, phase = s
        root = _first(row_col < 0)
        return (*_augment_from(c, u, v, row_col, col_row, root), phase + 1)

    # Each phase matches one more row; the bound again only matters for non-finite costs.
    _, _, row_col, _, _ = jax.lax.while_loop(
        lambda s: jnp.any(s[2] < 0) & (s[4] < n), body, (u, v, row_col, col_row, jnp.int32(0)))
    return row_col
