"""Searching a plan for a latency budget: the paper's PHAST generalised from attention maps to every unit.

Maximise the paper's utility (mean PSNR against the full sampler on calibration prompts) subject to the predicted
latency (`latency.LatencyModel`) staying within the budget. Start from the best of many single points that fit
(`space.seeds`: DeepCache, step-reduction-like refreshes, HURRY and PAB-like attention reuse) and of a dynamic
program over refresh calls (as DPCache, Wang et al. 2026: a cost table of reusing from each call to each later
one, conditioned on the last refresh; for the two cheapest levels), then hill-climb with moves that keep within the
budget, scored in batches by the prefix-shared `evaluator.Evaluator`. Resumable: the utilities and the profile
are kept.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..layers import denoiser
from ..pipelines.sampling import GenerationSetup
from ..plan_cache import weights_fingerprint
from ..refresh import refresh_program
from .evaluator import Evaluator, PlanningError, candidate_key, check_setup, read_state, setup_key, write_state
from .latency import LatencyModel, measure_latency, profile
from .levels import Levels
from .space import Candidate, neighbours, seeds

__all__ = ["search_plan", "PlanSearch", "Shards"]

USEFUL = 0.9  # a branch depth whose calls cost more than this share of a plain call is left out of the search
CHUNK = 48  # neighbours scored per batch: large enough to share prefixes, small enough to stop on time
PROGRAMMED = 2  # the dynamic program runs for the cheapest levels only: it costs a trajectory per call


class Shards:
    """Candidate evaluation spread over processes (`accelerate launch` or torchrun): each scores every
    `count`-th candidate of a batch, and the utilities are gathered, so that every process climbs the same path.
    One process (`count` 1) is the default."""

    def __init__(self, index: int = 0, count: int = 1, gather=None, broadcast=None):
        self.index, self.count, self.gather, self.broadcast = index, count, gather, broadcast

    @property
    def main(self) -> bool:
        return self.index == 0

    @classmethod
    def from_accelerate(cls) -> Shards:
        """The processes `accelerate launch` or torchrun started (one where neither did)."""
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list, gather_object

        state = PartialState()
        if state.num_processes == 1:
            return cls()
        return cls(state.process_index, state.num_processes, gather_object,
                   lambda value: broadcast_object_list([value])[0])


class PlanSearch:
    """One search for one budget: its evaluator, latency model and history (see the module docstring)."""

    def __init__(self, setup: GenerationSetup, budget: float, state_file=None, progress: bool = True,
                 latency: LatencyModel | None = None, shards: Shards | None = None):
        self.setup, self.budget, self.shards = setup, budget, shards or Shards()
        self.progress = progress and self.shards.main
        state_file = state_file if self.shards.main else None  # one process writes the state
        self.state_file = Path(state_file) if state_file else None
        self.structure = Levels.of(denoiser(setup.pipe))
        self.top = self.structure.top
        saved = self._load({**setup_key(setup), "budget": budget})
        if latency is None and self.shards.main:
            latency = LatencyModel.from_dict(saved["latency"]) if saved else profile(setup, self.structure,
                                                                                     progress=progress)
        self.latency = latency if self.shards.count == 1 else self.shards.broadcast(latency)
        self.allowed = [0] + [lv for lv in range(1, self.top) if self.latency.costs[lv]["compute"] <= USEFUL]
        self.allowed.append(self.top)
        cheapest = Candidate((0,) + (self.top,) * (setup.num_steps - 1), (1,) * setup.num_steps,
                             structure=self.structure)
        if cheapest.cost(self.latency) > budget:
            raise PlanningError(f"a budget of {budget:g} is below the cheapest plan's predicted latency "
                             f"({cheapest.cost(self.latency):.3f}: one computed call, the rest reused).")
        utilities = None if self.state_file is None else self.state_file.with_suffix(".utilities.json")
        self.evaluator = Evaluator(setup, state_file=utilities)
        self.history, self.seen = [], 0
        self._bar = tqdm(desc=f"plan for {budget:g}", unit="candidate", disable=not progress, dynamic_ncols=True)

    @property
    def key(self) -> dict:
        return {**self.evaluator.key, "budget": self.budget}

    def _load(self, key: dict) -> dict | None:
        """The state of this search saved earlier (its profile and history); one of another setup is refused."""
        if self.state_file is None or not self.state_file.exists():
            return None
        saved = read_state(self.state_file, "plan search state file", "latency")
        check_setup(self.state_file, saved, key)
        return saved

    def _save(self) -> None:
        write_state(self.state_file, self.key, latency=self.latency.to_dict(), history=self.history)

    def score(self, candidates: list[Candidate]) -> list[float]:
        plans = [c.plan() for c in candidates]
        if self.shards.count > 1:  # score a share here, then learn the others' utilities
            todo = sorted({candidate_key(p): p for p in plans if candidate_key(p) not in self.evaluator.utilities})
            mine = todo[self.shards.index::self.shards.count]
            scored = self.evaluator([plan for _, plan in mine]) if mine else []
            for key, utility in self.shards.gather([(k, u) for (k, _), u in zip(mine, scored)]):
                self.evaluator.utilities[key] = utility
        utilities = self.evaluator(plans)
        self.seen += len(candidates)
        self._bar.update(len(candidates))
        return utilities

    def dynamic_program(self, level: int) -> Candidate:
        """The refresh calls that minimise the summed latent error of reusing `level` from each refresh to the next,
        as many refreshes as fit the budget (DPCache's dynamic program over key steps)."""
        n = self.setup.num_steps
        errors = self._error_table(level)
        cost = {c: self.latency.call_cost(c, "compute") for c in (0, level)}
        per_key = cost[0] - cost[level]
        slack = self.budget * (self.latency.fixed + n) - self.latency.fixed - n * cost[level]
        keys = max(1, min(n, int(slack / per_key) if per_key > 0 else n))
        chosen = refresh_program(errors, keys)
        levels = tuple(0 if c in chosen else level for c in range(n))
        return Candidate(levels, (1,) * n, "output", self.structure)

    def _error_table(self, level: int) -> list[list[float]]:
        """errors[i][j]: mean squared latent error before call j, reusing `level` at every call after i."""
        n = self.setup.num_steps
        reference = self.evaluator.trajectory(Candidate((0,) * n, (1,) * n, structure=self.structure).plan())
        errors = [[0.0] * (n + 1) for _ in range(n)]
        for i in range(n - 1):
            path = self.evaluator.trajectory(Candidate((0,) * (i + 1) + (level,) * (n - i - 1), (1,) * n,
                                                       structure=self.structure).plan())
            for j in range(i + 2, n + 1):
                errors[i][j] = float(torch.mean((path[j - 1] - reference[j - 1]).float() ** 2))
        return errors

    def late(self, deadline: float) -> bool:
        """Whether the time is up (the main process's clock decides for all)."""
        late = time.perf_counter() > deadline
        return late if self.shards.count == 1 else self.shards.broadcast(late)

    def climb(self, start: Candidate, utility: float, sweeps: int, deadline: float, limit: int) -> tuple:
        """Steepest ascent: each sweep scores the neighbours in batches of CHUNK (stopping when time is up) and moves
        to the best improving one."""
        best, opt = start, utility
        for sweep in range(1, sweeps + 1):
            if self.late(deadline):
                break
            moves = neighbours(best, self.latency, self.budget, self.allowed, limit, seed=sweep)
            scored = []
            for first in range(0, len(moves), CHUNK):
                chunk = moves[first:first + CHUNK]
                scored += zip(self.score(chunk), chunk)
                if self.late(deadline):
                    break
            top = max(scored, default=(opt, best), key=lambda p: p[0])
            self.history.append({"sweep": sweep, "candidates": len(moves), "best": max(top[0], opt)})
            self._bar.set_postfix(psnr=f"{max(top[0], opt):.2f}")
            self._save()
            if top[0] <= opt:
                break
            opt, best = top
        return best, opt


def search_plan(setup: GenerationSetup, budget: float, state_file=None, progress: bool = True,
                time_limit: float = 840.0, sweeps: int = 30, limit: int = 240, measure: bool = True,
                latency: LatencyModel | None = None, shards: Shards | None = None):
    """The plan of best utility whose predicted latency is within `budget` (a ratio to the full sampler), with its
    search recorded in the plan's `meta` (seeds, dynamic program and hill-climb, predicted and, with `measure`,
    measured latency). Stops climbing `time_limit` seconds after it started (profile included); `shards` spreads
    the scoring over processes."""
    started = time.perf_counter()
    search = PlanSearch(setup, budget, state_file, progress, latency, shards)
    found = seeds(setup.num_steps, search.structure, search.allowed, search.latency, budget)
    scores = search.score(found)
    best_seed = max(zip(scores, found), key=lambda p: p[0])
    cheapest = sorted(search.allowed[1:], key=lambda lv: search.latency.call_cost(lv, "compute"))[:PROGRAMMED]
    programmed = [search.dynamic_program(level) for level in cheapest]
    programmed = [c for c in programmed if c.cost(search.latency) <= budget]
    dp_scores = search.score(programmed) if programmed else []
    best_dp = max(zip(dp_scores, programmed), key=lambda p: p[0], default=(float("-inf"), None))
    start = max(best_seed, best_dp, key=lambda p: p[0])
    best, utility = search.climb(start[1], start[0], sweeps, started + time_limit, limit)
    search._bar.close()
    plan = best.plan(complete=False).at_timesteps(search.evaluator.timesteps.tolist())
    meta = {**search.key, "device_type": torch.device(setup.device).type,
            "weights": weights_fingerprint(denoiser(setup.pipe)), "strategy": "planner", "psnr_db": utility,
            "predicted_latency": best.cost(search.latency), "latency_model": search.latency.to_dict(),
            "best_seed_psnr_db": best_seed[0], "best_dp_psnr_db": best_dp[0],
            "dp_beat_seeds": best_dp[0] > best_seed[0], "climb_gain_db": utility - start[0],
            "candidates": search.seen, "model_calls": search.evaluator.calls,
            "naive_model_calls": search.evaluator.naive_calls, "history": search.history,
            "search_s": time.perf_counter() - started, "levels": list(best.levels),
            "attention": list(best.attention), "mode": best.mode}
    plan = type(plan)(plan.units, plan.timesteps, meta)
    if measure and search.shards.main:
        plan.meta["measured"] = measure_latency(setup, plan)
    return plan
