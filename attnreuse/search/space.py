"""The planner's search space: per denoiser call a reuse level and whether attention reuses.

Levels (`levels.Levels`) run from 0 (compute everything) over a UNet's branch at each depth or a transformer's last
blocks to `top`, the whole call reused. Attention reuse applies to the layers that run. A `Candidate` becomes a
`Plan` of an attention unit and the levels' units; DeepCache, FirstBlockCache, HURRY, PHAST and step reduction
(whole-call reuse under DDIM is a jump with the kept noise prediction) are single points of this space.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..plan import Plan, Unit
from .latency import LatencyModel
from .levels import Levels

__all__ = ["Candidate", "seeds", "neighbours", "fit"]


@dataclass(frozen=True)
class Candidate:
    """Per call: `levels` (0 compute .. `top` the whole call reused) and `attention` (1 compute, 0 reuse), on a
    model's `structure` (a UNet of 6 branch depths unless given)."""

    levels: tuple[int, ...]
    attention: tuple[int, ...]
    mode: str = "output"
    structure: Levels = Levels(7)

    def __post_init__(self):
        levels = (0,) + tuple(self.levels[1:])
        attention = tuple(1 if i == 0 or lv == self.top else a for i, (lv, a) in
                          enumerate(zip(levels, self.attention)))
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "attention", attention)

    @property
    def top(self) -> int:
        return self.structure.top

    def plan(self, complete: bool = True) -> Plan:
        """The plan: every unit (`complete`, so that candidates share prefixes in a search), or only those that
        reuse something (what is applied in the end: no wrapper without work)."""
        units = {"attention": Unit("attention", self.attention, self.mode), **self.structure.units(self.levels)}
        if not complete:
            units = {name: u for name, u in units.items() if not all(u.bits)} or {"call": units["call"]}
        return Plan(units)

    def attention_actions(self) -> list[str]:
        """What the running attention layers do at each call: the paper's lookahead over the calls where they
        run (not at whole-call reuse)."""
        runs = [lv != self.top for lv in self.levels]
        out = []
        for c, (run, bit) in enumerate(zip(runs, self.attention)):
            nxt = next((d for d in range(c + 1, len(runs)) if runs[d]), None)
            out.append("compute" if not run else "reuse" if not bit else
                       "store" if nxt is not None and not self.attention[nxt] else "compute")
        return out

    def cost(self, model: LatencyModel) -> float:
        return model.predict(self.levels, self.attention_actions())

    def key(self) -> str:
        return f"{self.mode}:" + ",".join(f"{lv}{'' if a else 'a'}" for lv, a in zip(self.levels, self.attention))


def fit(candidate: Candidate, model: LatencyModel, budget: float, allowed: list[int]) -> Candidate | None:
    """The candidate made cheap enough for the budget by deepening its latest shallowest calls, or None."""
    levels = list(candidate.levels)
    while Candidate(tuple(levels), candidate.attention, candidate.mode, candidate.structure).cost(model) > budget:
        movable = [c for c in range(len(levels) - 1, 0, -1) if levels[c] < candidate.top]
        if not movable:
            return None
        c = min(movable, key=lambda c: (levels[c], -c))
        levels[c] = next(lv for lv in allowed if lv > levels[c])
    return Candidate(tuple(levels), candidate.attention, candidate.mode, candidate.structure)


def _spaced(n: int, count: int, power: float) -> set[int]:
    """`count` calls from 0, spaced densely first for `power` > 1 (refreshes where the image still forms)."""
    return {min(n - 1, round((n - 1) * (i / max(1, count - 1)) ** power)) for i in range(count)}


def seeds(n: int, structure: Levels, allowed: list[int], model: LatencyModel, budget: float) -> list[Candidate]:
    """Single points of the space that fit the budget: HURRY-like and PAB-like attention reuse, DeepCache at each
    depth and interval, and step-reduction-like refreshes (whole-call or branch reuse between them) spaced evenly
    or front-loaded, as many as fit."""
    full, found = (1,) * n, []
    for mode in ("output", "map"):
        found += [Candidate((0,) * n, (1,) * (n - r) + (0,) * r, mode, structure) for r in range(1, n)]
        found.append(Candidate((0,) * n, tuple(1 - c % 2 for c in range(n)), mode, structure))
    found = [c for c in found if c.cost(model) <= budget]
    for level in [lv for lv in allowed if lv > 0]:
        for interval in range(2, 7):
            found.append(fit(Candidate(tuple(0 if c % interval == 0 else level for c in range(n)), full, "output",
                                       structure), model, budget, allowed))
        for power in (1.0, 1.5, 2.0, 2.5):
            for count in range(n - 1, 0, -1):
                keep = _spaced(n, count, power)
                made = Candidate(tuple(0 if c in keep else level for c in range(n)), full, "output", structure)
                if made.cost(model) <= budget:
                    found.append(made)
                    break
    return list({c.key(): c for c in found if c is not None}.values())


def _step(level: int, allowed: list[int], up: bool) -> int | None:
    later = [lv for lv in allowed if (lv > level if up else lv < level)]
    return (min(later) if up else max(later)) if later else None


def neighbours(current: Candidate, model: LatencyModel, budget: float, allowed: list[int], limit: int = 240,
               seed: int = 0) -> list[Candidate]:
    """One move from `current` that keeps within the budget: move a refresh to another call, deepen or make
    shallower one call's reuse, trade one call's reuse for another's, flip one call's attention reuse, or the
    attention mode; at most `limit` (a seeded sample beyond)."""
    levels, n = list(current.levels), len(current.levels)
    moved = []
    for i in range(1, n):
        for j in range(1, n):
            if levels[i] == 0 and levels[j] > 0:  # move a refresh from i to j
                moved.append(_swap(levels, i, j))
    singles = {c: [_step(levels[c], allowed, up) for up in (True, False)] for c in range(1, n)}
    for c, (deeper, shallower) in singles.items():
        moved += [_with(levels, c, lv) for lv in (deeper, shallower) if lv is not None]
        for d in range(1, n):
            if d != c and shallower is not None and singles[d][0] is not None:  # trade c's reuse for d's
                moved.append(_with(_with(levels, c, shallower), d, singles[d][0]))
    out = [Candidate(tuple(lv), current.attention, current.mode, current.structure) for lv in moved]
    for c in range(1, n):
        flipped = list(current.attention)
        flipped[c] = 1 - flipped[c]
        out.append(Candidate(current.levels, tuple(flipped), current.mode, current.structure))
    out.append(Candidate(current.levels, current.attention, "map" if current.mode == "output" else "output",
                         current.structure))
    unique = {c.key(): c for c in out if c.key() != current.key() and c.cost(model) <= budget}
    chosen = list(unique.values())
    if len(chosen) > limit:
        chosen = random.Random(seed).sample(chosen, limit)
    return chosen


def _swap(levels: list[int], i: int, j: int) -> list[int]:
    out = list(levels)
    out[i], out[j] = out[j], out[i]
    return out


def _with(levels: list[int], c: int, level: int) -> list[int]:
    out = list(levels)
    out[c] = level
    return out
