"""Searching reuse schedules as pure functions of a utility: PHAST (the paper's Algorithm 1) and exhaustive search.

A utility maps a list of schedules to their scores (an `Evaluator`, or any function); nothing here runs a model.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from ..plan import Schedule

__all__ = ["bit_flips", "phast", "exhaustive", "named_schedules", "EXHAUSTIVE_MAX_STEPS"]

EXHAUSTIVE_MAX_STEPS = 16  # C(15, 7) = 6435 schedules at most: beyond, the search takes too long


def bit_flips(bits) -> list[tuple[int, ...]]:
    """All schedules one swap of a reuse step with a compute step away (the number of reuse steps is kept; the first
    step always computes) (Hunter, Dudziak et al. 2024, Algorithm 1, BitFlipSet)."""
    ones = [i for i, b in enumerate(bits) if b and i > 0]
    zeros = [i for i, b in enumerate(bits) if not b]
    out = []
    for i, j in itertools.product(ones, zeros):
        flipped = list(bits)
        flipped[i], flipped[j] = 0, 1
        out.append(tuple(flipped))
    return out


def phast(utility, num_steps: int, reuse_steps: int, epsilon: float = 0.0, start=None,
          max_sweeps: int = 100) -> tuple[Schedule, list[dict]]:
    """PHAST (Hunter, Dudziak et al. 2024, Algorithm 1): hill-climb from HURRY by swapping one reuse step with one
    compute step.

    Each sweep scores every swap of the sweep's starting schedule (BitFlipSet fixed per sweep) in one batch and
    walks them in order, keeping a swap whose utility beats the best so far by more than `epsilon`; it stops
    after a sweep without improvement. Returns the best schedule and the history of sweeps.
    """
    best = tuple(Schedule(start).bits if start is not None else Schedule.hurry(num_steps, reuse_steps).bits)
    opt = utility([best])[0]
    history = [{"sweep": 0, "schedule": str(Schedule(best)), "utility": opt, "candidates": 1}]
    for sweep in range(1, max_sweeps + 1):
        candidates = bit_flips(best)
        scores = utility(candidates)
        start_opt, chosen = opt, best
        for candidate, score in zip(candidates, scores):
            if score > opt + epsilon:
                chosen, opt = candidate, score
        best = chosen
        history.append({"sweep": sweep, "schedule": str(Schedule(best)), "utility": opt,
                        "candidates": len(candidates)})
        if opt == start_opt:
            break
    return Schedule(best, meta={"strategy": "phast", "epsilon": epsilon, "sweeps": len(history) - 1}), history


def exhaustive(utility, num_steps: int, reuse_steps: int) -> list[tuple[Schedule, float]]:
    """Every schedule with `reuse_steps` reuse steps (the first step computes: C(N-1, r) of them), ranked by
    utility, best first."""
    if num_steps > EXHAUSTIVE_MAX_STEPS:
        raise ValueError(f"Exhaustive search is for N <= {EXHAUSTIVE_MAX_STEPS}; C({num_steps - 1}, {reuse_steps}) "
                         "schedules would take too long. Use phast instead.")
    schedules = []
    for zeros in itertools.combinations(range(1, num_steps), reuse_steps):
        schedules.append(tuple(0 if i in zeros else 1 for i in range(num_steps)))
    scores = utility(schedules)
    ranked = sorted(zip(schedules, scores), key=lambda p: -p[1])
    return [(Schedule(bits, meta={"strategy": "exhaustive"}), score) for bits, score in ranked]


def named_schedules(names, num_steps: int, reuse_steps: int, timesteps=None, seed: int = 0):
    """(name, Schedule) pairs for `hurry`, `early` (reuse steps 2..r+1), `random:K` (K schedules with r reuse
    steps, seeded), a bit string or a schedule JSON file. A JSON schedule of another length or sampler is moved
    to `timesteps` by nearest timestep (paper sec. 3.1)."""
    rng = np.random.default_rng(seed)
    for name in names:
        if name == "hurry":
            yield name, Schedule.hurry(num_steps, reuse_steps)
        elif name == "early":
            yield name, Schedule([1] + [0] * reuse_steps + [1] * (num_steps - 1 - reuse_steps))
        elif name.startswith("random"):
            for k in range(int(name.partition(":")[2] or 1)):
                zeros = set(rng.choice(np.arange(1, num_steps), size=reuse_steps, replace=False).tolist())
                yield f"random {k + 1}", Schedule([0 if i in zeros else 1 for i in range(num_steps)])
        elif name.endswith(".json"):
            schedule = Schedule.from_json(Path(name))
            if schedule.timesteps is not None and timesteps is not None:
                schedule = schedule.for_timesteps([float(t) for t in timesteps])
            yield f"{Path(name).stem} ({schedule.meta.get('strategy', 'file')})", schedule
        else:
            yield name, Schedule(name)
