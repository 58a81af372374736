"""The quick planner: a plan for a latency budget from one recorded run of the full sampler.

1. Record: the evaluator's reference run (the full sampler on the calibration prompts) keeps the denoiser's raw
   output and wall time at every call (`evaluator.Recording`).
2. Table: `errors[i][j]`, the final-latent error of reusing call i's output (or its residual) at calls i+1..j-1,
   each found by replaying the sampler from the reference state after call i with the recorded outputs and the
   kept one substituted. The scheduler itself weighs an output error by how far it moves the final latent (any
   sampler, a multistep one's history included); only the scheduler runs, never the denoiser. (The unweighted
   change of the output between calls ranks refreshes far worse: issue 25's probe.)
3. Program: DPCache's dynamic program (`refresh.refresh_program`, Wang et al. 2026) picks the refresh calls, as
   many computed calls as the latency model allows within the budget.
4. Verify: the programmed candidate of each reuse mode (output, and residual where the output is shaped like the
   input) runs for real, sharing prefixes; the best measured one is the plan. With a target PSNR instead of a
   budget, a bisection over the refresh count verifies the candidates of each count it tries.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from ..layers import denoiser
from ..pipelines.sampling import GenerationSetup
from ..pipelines.timing import timed
from ..plan import Plan, Unit
from ..plan_cache import weights_fingerprint
from ..refresh import latent_psnr, refresh_program, refresh_sources, segment_errors
from .evaluator import Evaluator, PlanningError
from .latency import LatencyModel, cached_profile, measure_latency
from .levels import Levels
from .space import Candidate

__all__ = ["quick_plan", "QuickSearch", "replay", "replay_sources", "predicted_psnr", "error_table", "refresh_count",
           "quick_latency"]

PROFILE_REPEATS = 3  # paired timings of a reused call: it costs little, so few are needed


@torch.no_grad()
def replay(evaluator: Evaluator, start: int, kept: int, until: int, residual: bool = False) -> torch.Tensor:
    """The final latents when calls start+1 .. until-1 return call `kept`'s recorded output (or, with `residual`,
    its output minus its input plus their own input) and every other call its recorded output; from the
    reference state after call `start`."""
    n = len(evaluator.reference.outputs)
    return replay_sources(evaluator, [kept if start < c < until else c for c in range(n)], start, residual)


@torch.no_grad()
def replay_sources(evaluator: Evaluator, sources: list[int], start: int = -1, residual: bool = False):
    """The final latents when, from the reference state after call `start`, call c returns call `sources[c]`'s
    recorded output (its residual on c's own input where the source is another call and `residual`)."""
    reference, sampling = evaluator.reference, evaluator.sampling
    latents, scheduler = reference.states[start] if start >= 0 else sampling.start
    scheduler = copy.deepcopy(scheduler)
    for c in range(start + 1, len(reference.outputs)):
        output = reference.outputs[sources[c]]
        base = reference.inputs[sources[c]] if residual and sources[c] != c else None
        latents = sampling.step(_Replayed(output, base), scheduler, latents, evaluator.timesteps[c])
    return latents


def predicted_psnr(evaluator: Evaluator, refreshes: tuple[int, ...], residual: bool) -> float:
    """The latent PSNR the plan computing only at `refreshes` keeps, replayed (first order: no denoiser runs)."""
    sources = refresh_sources(len(evaluator.reference.outputs), refreshes)
    return latent_psnr(replay_sources(evaluator, sources, -1, residual), evaluator.reference.states[-1][0])


class _Replayed:
    """A denoiser call that returns a kept output, or (with the input `base` it was computed from) the kept
    residual added to the input it is given, as a call unit's reuse does."""

    def __init__(self, output, base=None):
        self.output, self.base = output, base

    def __call__(self, sample, *args, **kwargs):
        return (self.output if self.base is None else self.output - self.base + sample,)


def error_table(evaluator: Evaluator, residual: bool = False) -> list[list[float]]:
    """errors[i][j]: mean squared error of the final latents when calls i+1..j-1 reuse call i (j = n: the end)."""
    n = len(evaluator.reference.outputs)
    return segment_errors(n, evaluator.reference.states[n - 1][0], lambda i, j: replay(evaluator, i, i, j, residual))


def refresh_count(latency: LatencyModel, n: int, budget: float, top: int) -> int:
    """The most computed calls (refreshes) whose plan, every other call reused whole, fits the budget."""
    reused = latency.call_cost(top, "compute")
    fits = [k for k in range(1, n + 1) if (latency.fixed + k + (n - k) * reused) / (latency.fixed + n) <= budget]
    if not fits:
        cheapest = (latency.fixed + 1 + (n - 1) * reused) / (latency.fixed + n)
        raise PlanningError(f"a budget of {budget:g} is below the cheapest plan's predicted latency ({cheapest:.3f}: "
                         "one computed call, the rest reused).")
    return max(fits)


def quick_latency(setup: GenerationSetup, evaluator: Evaluator, structure: Levels) -> tuple[LatencyModel, bool]:
    """The latency model the quick planner needs: a reused call timed against plain calls (cached per model,
    device, dtype and batch), and the fixed cost: encoding and decoding again, warm, in reference calls;
    and whether the timing came from the cache."""
    kinds = [(0, "compute"), (structure.top, "compute")]  # plain, and the whole call reused
    latency, cached = cached_profile(setup, structure, kinds, PROFILE_REPEATS)
    per_call = statistics.median(evaluator.reference.seconds)
    latency.fixed = _outside_seconds(evaluator, setup.device) / per_call
    latency.plain_ms = per_call * 1000
    return latency, cached


def _outside_seconds(evaluator: Evaluator, device, repeats: int = 3) -> float:
    """A generation's time outside the denoiser, warm: encoding the prompts and decoding the latents again (no
    denoiser call), the median of `repeats`."""
    sampling, final = evaluator.sampling, evaluator.reference.states[-1][0]
    with torch.no_grad():
        runs = [timed(lambda: (sampling.encode(), sampling.images(final)), device)[1] for _ in range(repeats)]
    return statistics.median(runs)


def quick_plan(setup: GenerationSetup, budget: float | None = None, progress: bool = True, measure: bool = True,
               latency: LatencyModel | None = None, target_psnr: float | None = None):
    """The quick planner (module docstring): the best verified of a few programmed plans whose predicted latency is
    within `budget`; or, with `target_psnr` instead, the fewest refreshes whose verified calibration PSNR reaches
    it (a bisection over the refresh count). Its cost (denoiser calls that ran, full runs of the calibration set,
    seconds) is in the plan's meta (`measure`, the plan's measured latency at the end, is not part of it)."""
    if (budget is None) == (target_psnr is None):
        raise ValueError("quick_plan needs a latency budget or a target PSNR, one of the two.")
    started = time.perf_counter()
    model = denoiser(setup.pipe)
    with _Computed(model) as computed:
        search = QuickSearch(setup, Evaluator(setup, progress=progress, record=True), Levels.of(model), latency)
        if target_psnr is None:
            keys = refresh_count(search.latency, setup.num_steps, budget, search.structure.top)
        else:
            keys = search.fewest_refreshes(target_psnr)
        found, utilities = search.verified(keys)
    best = max(range(len(found)), key=lambda k: utilities[k])
    n, evaluator = setup.num_steps, search.evaluator
    plan = _call_plan(found[best]).at_timesteps(evaluator.timesteps.tolist())
    meta = {**evaluator.key, "budget": budget, "target_psnr_db": target_psnr,
            "device_type": torch.device(setup.device).type, "weights": weights_fingerprint(model),
            "strategy": "quick planner", "psnr_db": utilities[best],
            "predicted_latency": found[best].cost(search.latency), "latency_model": search.latency.to_dict(),
            "candidates": len(search.tried), "candidate_psnr_db": utilities, "refreshes": keys,
            "profile_cached": search.cached, "denoiser_calls": computed.calls, "full_runs": computed.calls / n,
            "search_s": time.perf_counter() - started, "levels": list(found[best].levels), "mode": found[best].mode}
    plan = type(plan)(plan.units, plan.timesteps, meta)
    if measure:
        plan.meta["measured"] = measure_latency(setup, plan)
    return plan


class QuickSearch:
    """One quick planning: the evaluator (with its recorded reference run), the latency model, the error table of
    each reuse mode, and the candidates verified so far."""

    def __init__(self, setup: GenerationSetup, evaluator: Evaluator, structure: Levels, latency=None):
        self.setup, self.evaluator, self.structure = setup, evaluator, structure
        self.cached = latency is not None  # a profile given: nothing timed here
        if latency is None:
            latency, self.cached = quick_latency(setup, evaluator, structure)
        self.latency = latency
        modes = ["output"] + (["residual"] if _shaped_alike(evaluator) else [])
        self.tables = {mode: error_table(evaluator, residual=mode == "residual") for mode in modes}
        self.tried: dict = {}

    def verified(self, keys: int, modes=None) -> tuple[list[Candidate], list[float]]:
        """The programmed candidate of each mode (of `modes`, default all) with `keys` refreshes, and their verified
        utilities (a candidate verified before costs nothing again)."""
        n, top = self.setup.num_steps, self.structure.top
        found = []
        for mode in modes or self.tables:
            chosen = refresh_program(self.tables[mode], keys)
            found.append(Candidate(tuple(0 if c in chosen else top for c in range(n)), (1,) * n, mode,
                                   self.structure))
        utilities = self.evaluator([_call_plan(c) for c in found])
        self.tried.update({c.key(): u for c, u in zip(found, utilities)})
        return found, utilities

    def fewest_refreshes(self, target: float) -> int:
        """The fewest refreshes whose verified candidate reaches `target` dB (all of them, the full sampler, always
        does): a bisection that verifies, at each count it tries, only the mode whose replay predicts more."""
        low, high = 1, self.setup.num_steps
        while low < high:
            middle = (low + high) // 2
            if max(self.verified(middle, [self._likelier(middle)])[1]) >= target:
                high = middle
            else:
                low = middle + 1
        return high

    def _likelier(self, keys: int) -> str:
        """The mode whose programmed candidate with `keys` refreshes the replay predicts to keep more."""
        return max(self.tables, key=lambda mode: predicted_psnr(
            self.evaluator, refresh_program(self.tables[mode], keys), mode == "residual"))


class _Computed:
    """Counts the denoiser calls that run the model (a whole-call reuse runs none of its parts): a hook on the
    model's first part, each call over the whole calibration batch."""

    def __init__(self, model):
        self.part, self.calls = next(model.children()), 0

    def __enter__(self):
        self._hook = self.part.register_forward_pre_hook(lambda *a: self._count())
        return self

    def _count(self) -> None:
        self.calls += 1

    def __exit__(self, *exc):
        self._hook.remove()


def _shaped_alike(evaluator: Evaluator) -> bool:
    """Whether the denoiser's output is shaped like its input (residual reuse needs it; PixArt's learned sigma
    doubles the channels)."""
    return evaluator.reference.outputs[0].shape == evaluator.reference.inputs[0].shape


def _call_plan(candidate: Candidate):
    """The candidate as the plan that is applied: its call unit alone (in the candidate's mode)."""
    bits = tuple(0 if lv == candidate.top else 1 for lv in candidate.levels)
    return Plan({"call": Unit("call", bits, candidate.mode)})
