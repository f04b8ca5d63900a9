"""MaxRoaming (DTR Table 8) masks against the definition of Pascal et al. 2021, replayed swap by
swap, and their path through the train step (masks follow the step counter on the device)."""
import jax.numpy as jnp
import numpy as np
import pytest

from switch_dit_jax.models import build_model, roaming

import test_train

C, BETA, TASKS = 20, 0.8, 3
ACTIVE, SWAPS = 16, 4  # int(0.8 · 20), C - 16


def history(seed=0, block=0):
    """[SWAPS + 1, TASKS, C] masks after 0..SWAPS swaps (and a few past the end)."""
    return np.stack([np.asarray(roaming.roaming_masks(seed, block, TASKS, C, BETA, n))
                     for n in range(SWAPS + 3)])


def test_every_mask_activates_the_fraction_beta():
    masks = history()
    assert set(np.unique(masks)) == {0.0, 1.0}
    np.testing.assert_array_equal(masks.sum(-1), ACTIVE)


def test_each_swap_trades_one_active_channel_for_one_never_visited():
    masks = history()
    for task in range(TASKS):
        visited = masks[0, task].astype(bool)
        for n in range(1, SWAPS + 1):
            before, after = masks[n - 1, task].astype(bool), masks[n, task].astype(bool)
            gained, lost = np.flatnonzero(after & ~before), np.flatnonzero(before & ~after)
            assert len(gained) == 1 and len(lost) == 1
            assert not visited[gained[0]]  # maximum roaming: never a revisit
            visited[gained[0]] = True
        assert visited.all()  # every channel visited after C - int(βC) swaps
        for n in range(SWAPS + 1, SWAPS + 3):  # nothing left to visit: the partition stays
            np.testing.assert_array_equal(masks[n, task], masks[SWAPS, task])


def test_masks_are_a_function_of_seed_block_task_and_step():
    np.testing.assert_array_equal(history(), history())
    assert not np.array_equal(history(0, 0), history(0, 1))
    assert not np.array_equal(history(0, 0), history(1, 0))
    first = history()[0]
    assert not np.array_equal(first[0], first[1])  # tasks draw their own partitions


def test_dropped_channel_is_uniform_over_the_active_ones():
    # Over many (seed, task) draws the first swap drops each rank of the sorted active set
    # about equally often: a uniform choice among the ACTIVE channels (the authors'
    # random.sample), not a fixed slot.
    counts = np.zeros(ACTIVE)
    for seed in range(40):
        masks = history(seed)[:2]
        for task in range(TASKS):
            active = np.flatnonzero(masks[0, task])
            lost = np.flatnonzero((masks[0, task] == 1) & (masks[1, task] == 0))[0]
            counts[list(active).index(lost)] += 1
    assert counts.sum() == 120 and counts.max() <= 20  # 7.5 expected per rank


def test_swap_count_follows_the_period():
    got = [int(roaming.swaps_at(s, 10, C, BETA)) for s in (0, 9, 10, 19, 20, 39, 40, 1000)]
    assert got == [0, 0, 1, 1, 2, 3, 4, 4]


def maxroaming_config(**extra):
    return test_train.tiny_config(**{"model.routing.kind": "maxroaming",
                                     "model.routing.clusters": 4,
                                     "model.routing.roaming_period": 2, **extra})


def test_train_step_masks_follow_the_step_and_sampling_uses_the_final_ones():
    model, state, seen = test_train.train_seeing_dit_calls(
        maxroaming_config(), 5, lambda dit, x, t: (t, roaming.block_rows(dit, 0, t)))
    width, r = model.hidden_size, model.routing
    assert len(seen) == 5
    for s, (t, rows) in enumerate(seen):
        expected = np.asarray(roaming.roaming_masks(r["seed"], 0, 4, width, r["beta"], s // 2))
        np.testing.assert_array_equal(rows, expected[np.asarray(t) * 4 // r["num_tasks"]])
    # Outside training: every swap done (num_swaps · period), or the configured step.
    x = jnp.zeros((2, 8, 8, 1))
    t = jnp.array([0, 999])
    variables = {"params": state.params}
    final = model.apply(variables, x, t, method=lambda m, x, t: roaming.block_rows(m, 0, t))
    done = roaming.num_swaps(width, r["beta"])
    expected = np.asarray(roaming.roaming_masks(r["seed"], 0, 4, width, r["beta"], done))
    np.testing.assert_array_equal(final, expected[[0, 3]])
    at_three = build_model(maxroaming_config(**{"model.routing.roaming_sample_step": 3}).model)
    rows = at_three.apply(variables, x, t, method=lambda m, x, t: roaming.block_rows(m, 0, t))
    expected = np.asarray(roaming.roaming_masks(r["seed"], 0, 4, width, r["beta"], 1))
    np.testing.assert_array_equal(rows, expected[[0, 3]])


@pytest.mark.parametrize("field,value", [("roaming_period", 0), ("roaming_sample_step", -2)])
def test_bad_roaming_fields_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"model.routing.{field}"):
        build_model(maxroaming_config(**{f"model.routing.{field}": value}).model)
