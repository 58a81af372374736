"""PHAST and exhaustive search as pure functions of a utility, and the named schedules to compare."""

import math

import pytest

from attnreuse import Schedule
from attnreuse.search import bit_flips, exhaustive, named_schedules, phast


def test_bit_flips_keep_the_reuse_count_and_the_first_step():
    flips = bit_flips((1, 1, 1, 0, 0))
    assert len(flips) == 2 * 2 and len(set(flips)) == 4
    assert all(f[0] == 1 and sum(f) == 3 for f in flips)


def test_phast_reaches_the_known_optimum_of_a_synthetic_utility():
    target = (1, 1, 0, 1, 0, 0, 1, 0, 1, 0)
    calls = []

    def utility(schedules):  # higher when closer to the target: the hill-climb must get there
        calls.append(len(schedules))
        return [-sum(a != b for a, b in zip(Schedule(s).bits, target)) for s in schedules]

    best, history = phast(utility, 10, 5)
    assert best == target and best.meta["strategy"] == "phast"
    assert history[0]["schedule"] == "1111100000" and history[-1]["utility"] == 0
    assert [h["utility"] for h in history] == sorted(h["utility"] for h in history)  # never worse
    assert calls[0] == 1 and all(c == 4 * 5 for c in calls[1:])  # one batch of (N - r) * r swaps per sweep
    # epsilon: a swap must gain more than it; with epsilon = 2 nothing is ever kept
    assert phast(utility, 10, 5, epsilon=2)[0] == Schedule.hurry(10, 5)


def test_exhaustive_ranks_every_schedule():
    target = (1, 0, 1, 1, 0, 1, 0)
    ranked = exhaustive(lambda ss: [-sum(a != b for a, b in zip(s, target)) for s in ss], 7, 3)
    assert len(ranked) == math.comb(6, 3) and ranked[0][0] == target and ranked[0][1] == 0
    assert [u for _, u in ranked] == sorted((u for _, u in ranked), reverse=True)
    with pytest.raises(ValueError, match="for N <= 16"):
        exhaustive(lambda ss: [0] * len(ss), 20, 10)


def test_named_schedules_and_moving_a_searched_schedule(tmp_path):
    named = dict(named_schedules(["hurry", "early", "random:2", "110100"], 6, 2))
    assert named["hurry"] == (1, 1, 1, 1, 0, 0) and named["early"] == (1, 0, 0, 1, 1, 1)
    assert named["random 1"].num_reuse == named["random 2"].num_reuse == 2 and named["110100"] == (1, 1, 0, 1, 0, 0)
    path = tmp_path / "s.json"
    Schedule("1111010000", timesteps=[900, 800, 700, 600, 500, 400, 300, 200, 100, 0], meta={"strategy": "phast"}
             ).to_json(path)
    (name, moved), = named_schedules([str(path)], 5, 2, timesteps=[900, 700, 500, 300, 100])
    assert name == "s (phast)" and moved == (1, 1, 0, 0, 0) and moved.meta["moved_from"] == 10
