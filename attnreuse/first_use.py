"""Planning at first use: `apply_reuse(pipe, budget=0.5)` with no plan.

The first generation of a setup (or the first `calibration` ones) runs the full sampler, so its image is the stock
pipeline's, and records at every call what the sampler was given (the guided model output, the latents, the
scheduler's state) and how long the denoiser and the rest took. After it, the plan is made from that recording
alone: the table of segment errors from replaying the sampler (`refresh.segment_errors`), DPCache's program for as
many computed calls as the measured times allow within the budget (or the fewest whose replayed PSNR reaches a
target), in the whole call's output or residual mode, whichever replays closer. Later generations follow it, and
it is kept on disk (`plan_cache`) for the next process.

What the plan is predicted to keep is measured on the final latents by replay (no denoiser runs at planning), so
`target_psnr` is a latent PSNR here; `attnreuse plan --target-psnr` verifies on decoded images instead.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import statistics
import time
from pathlib import Path

import torch

from .plan import Plan, Unit
from .plan_cache import entry_path, read_entry, weights_fingerprint, write_entry
from .refresh import latent_psnr, refresh_program, refresh_sources, segment_errors

logger = logging.getLogger(__name__)

__all__ = ["FirstUse", "Recording", "plan_from_recordings", "checked_goal"]


def checked_goal(budget, target_psnr, calibration) -> tuple[float | None, float | None, int]:
    """The goal of planning at first use, refused with one line when it cannot be met or is not one goal."""
    if (budget is None) == (target_psnr is None):
        raise ValueError("planning at first use needs one goal: budget= (latency as a fraction of the full "
                         "sampler's) or target_psnr= (dB to keep), not both and not neither.")
    for name, value in (("budget", budget), ("target_psnr", target_psnr)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}.")
    if budget is not None and budget > 1:
        raise ValueError(f"budget={budget:g} asks for more than the full sampler's latency; give a fraction up to 1.")
    if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 1:
        raise ValueError(f"calibration must be a whole number of generations, at least 1, got {calibration!r}.")
    return budget, target_psnr, calibration


class Recording:
    """One generation of the full sampler as its scheduler saw it: per call the guided model output, the latents
    and the scheduler's state before its step, the denoiser's input, and the denoiser's seconds."""

    def __init__(self, scheduler):
        self.scheduler, self.original = scheduler, type(scheduler).step
        self.signature = inspect.signature(self.original)
        self.outputs, self.samples, self.states, self.arguments, self.inputs = [], [], [], [], []
        self.seconds: list[float] = []
        self.final: torch.Tensor | None = None
        self.total_s = 0.0
        self.overhead_s = 0.0  # spent recording (copies), taken out of the generation's time

    def step(self, *args, **kwargs):
        """The scheduler's step, recorded (installed on the scheduler instance while the generation runs)."""
        started = time.perf_counter()
        bound = self.signature.bind(self.scheduler, *args, **kwargs)
        arguments = {k: _kept(v) for k, v in bound.arguments.items() if k != "self"}
        self.states.append(copy.deepcopy({k: v for k, v in vars(self.scheduler).items() if k != "step"}))
        self.outputs.append(arguments["model_output"].detach().clone())
        self.samples.append(arguments["sample"].detach().clone())
        self.arguments.append(arguments)
        self.overhead_s += time.perf_counter() - started
        out = self.original(self.scheduler, *args, **kwargs)
        started = time.perf_counter()
        self.final = _prev_sample(out).detach().clone()
        self.overhead_s += time.perf_counter() - started
        return out

    def denoised(self, sample, seconds: float) -> None:
        """A denoiser call of the generation: its input (for a residual's replay) and its time."""
        started = time.perf_counter()
        self.seconds.append(seconds)
        self.inputs.append(None if sample is None else sample.detach().clone())
        self.overhead_s += time.perf_counter() - started

    def rollout(self, sources: list[int], start: int = 0, residual: bool = False) -> torch.Tensor:
        """The final latents when, from the state before call `start`, call c's step is given the recorded output
        of call `sources[c]` (its residual added to the replayed input, with `residual`)."""
        latents = self.samples[start]
        scheduler = copy.copy(self.scheduler)
        vars(scheduler).update(copy.deepcopy(self.states[start]))
        vars(scheduler).pop("step", None)
        for c in range(start, len(self.outputs)):
            output = self.outputs[sources[c]]
            if residual and sources[c] != c:
                output = output - self.samples[sources[c]] + latents
            arguments = {k: _fresh(v) for k, v in self.arguments[c].items()}
            arguments.update(model_output=output, sample=latents)
            if "return_dict" in self.signature.parameters:
                arguments["return_dict"] = False
            latents = _prev_sample(self.original(scheduler, **arguments))
        return latents

    def errors(self, residual: bool) -> list[list[float]]:
        n = len(self.outputs)
        return segment_errors(n, self.final, lambda i, j: self.rollout(
            [i if i < c < j else c for c in range(n)], i + 1, residual))

    def plan_psnr(self, refreshes: tuple[int, ...], residual: bool) -> float:
        """The latent PSNR the plan computing only at `refreshes` is predicted to keep (replayed)."""
        return latent_psnr(self.rollout(refresh_sources(len(self.outputs), refreshes), 0, residual), self.final)

    @property
    def residual_ok(self) -> bool:
        """Whether a residual can be replayed: the denoiser is given the latents themselves (no input scaling)
        and returns their shape."""
        return len(self.inputs) == len(self.samples) and all(
            x is not None and x[:len(s)].shape == s.shape and torch.equal(x[:len(s)], s) and o.shape == s.shape
            for x, s, o in zip(self.inputs, self.samples, self.outputs))


def _kept(value):
    """A step argument as recorded: a generator's state instead of the generator (replays draw from a copy)."""
    return ("generator", value.device, value.get_state()) if isinstance(value, torch.Generator) else value


def _fresh(value):
    if isinstance(value, tuple) and len(value) == 3 and value[0] == "generator":
        generator = torch.Generator(value[1])
        generator.set_state(value[2])
        return generator
    return value


def _prev_sample(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.prev_sample


def plan_from_recordings(recordings: list[Recording], budget: float | None, target_psnr: float | None) -> Plan:
    """The whole-call plan for these recordings of one setup: the most computed calls whose predicted latency fits
    `budget`, or the fewest whose replayed latent PSNR reaches `target_psnr`; output or residual mode, whichever
    replays closer. Its meta says the prediction."""
    n = len(recordings[0].outputs)
    plain = statistics.median(s for r in recordings for s in r.seconds)
    fixed = statistics.median(r.total_s - sum(r.seconds) for r in recordings) / plain
    modes = [False] + ([True] if all(r.residual_ok for r in recordings) else [])
    tables = {m: _mean_tables([r.errors(m) for r in recordings]) for m in modes}

    def best(keys: int) -> tuple[float, bool, tuple]:
        options = [(statistics.mean(r.plan_psnr(chosen, m) for r in recordings), m, chosen)
                   for m, chosen in ((m, refresh_program(tables[m], keys)) for m in modes)]
        return max(options, key=lambda o: o[0])

    def latency(keys: int) -> float:
        return (max(fixed, 0.0) + keys) / (max(fixed, 0.0) + n)

    if budget is not None:
        keys = max((k for k in range(1, n + 1) if latency(k) <= budget), default=None)
        if keys is None:
            raise ValueError(f"budget={budget:g} is below the cheapest plan's predicted latency "
                             f"({latency(1):.3f}: one computed call) on this pipeline.")
        psnr, residual, chosen = best(keys)
    else:
        for keys in range(1, n + 1):  # the fewest refreshes that keep the target (all of them always do)
            psnr, residual, chosen = best(keys)
            if psnr >= target_psnr:
                break
    bits = tuple(int(c in chosen) for c in range(n))
    meta = {"strategy": "first use", "budget": budget, "target_psnr_db": target_psnr, "refreshes": len(chosen),
            "predicted_latency": latency(len(chosen)), "predicted_latent_psnr_db": psnr,
            "calibration_generations": len(recordings), "plain_call_s": plain, "fixed_calls": fixed}
    return Plan({"call": Unit("call", bits, "residual" if residual else "output")}, meta=meta)


def _mean_tables(tables: list[list[list[float]]]) -> list[list[float]]:
    return [[statistics.mean(t[i][j] for t in tables) for j in range(len(tables[0][i]))]
            for i in range(len(tables[0]))]


class FirstUse:
    """A handle's planning at first use: per setup (the plan cache's key), its calibration recordings and plan,
    and where the plan in use came from (`stats`)."""

    def __init__(self, pipe, budget: float | None, target_psnr: float | None, calibration: int, cache: bool = True):
        self.pipe, self.model, self.budget, self.target_psnr = pipe, None, budget, target_psnr
        self.calibration, self.cache = calibration, cache
        self.recordings: dict[str, list[Recording]] = {}  # per setup's cache file: finished recordings
        self.plans: dict[str, tuple[Plan, str]] = {}  # per setup's cache file: the plan and where it came from
        self.recording: Recording | None = None  # the generation being recorded
        self.current: dict = {"source": "none yet: the next generation calibrates"}
        self._fingerprint: str | None = None
        self._sample: torch.Tensor | None = None
        self._call_started = self._clock = self._path = None
        self._first_call = True  # the next denoiser call is a generation's first
        self.timing: dict = {}  # per setup: seconds of whole generations, full (calibrating) and planned

    def bound(self, model) -> FirstUse:
        """This planning for the pipeline's denoiser `model`."""
        self.model = model
        return self

    # what the handle's hooks call
    def call_started(self) -> None:
        """A pipeline call begins (its `check_inputs`): the clock of the whole generation starts."""
        self._call_started = time.perf_counter()
        self._first_call = True

    def before_denoiser(self, sample) -> None:
        """Every denoiser call: its input (the key's batch, a residual's replay); its clock only where it may be
        recorded (a generation's first call, whose plan is picked inside it, and a recorded generation's calls),
        so a planned generation's calls wait for no device sync."""
        self._sample = sample
        if self.recording is not None or self._first_call:
            self._first_call = False
            self._sync()
            self._clock = time.perf_counter()

    def after_denoiser(self) -> None:
        if self.recording is not None and self._clock is not None:
            self._sync()
            self.recording.denoised(self._sample, time.perf_counter() - self._clock)

    def plan_for(self, timesteps: list[float], scheduler) -> Plan:
        """The plan of a pipeline generation about to make a call at each of `timesteps`: this setup's plan if it
        has one (made here or read from the cache), else the full sampler while this generation is recorded."""
        self._drop_recording("a generation was interrupted before it ended")
        key = self._key(len(timesteps), scheduler)
        entry = entry_path(key)
        path = str(entry)
        if path not in self.plans and self.cache:
            cached = read_entry(entry, key)
            if cached is not None:
                self.plans[path] = (cached, f"cache: {path}")
        self._path, self._key_now = path, key
        if path in self.plans:
            plan, source = self.plans[path]
            self.current = {"source": source, "plan_file": path, **_predicted(plan)}
            return plan if plan is not None else _all_compute(timesteps)
        done = len(self.recordings.get(path, []))
        self.current = {"source": f"calibrating: generation {done + 1} of {self.calibration} runs the full sampler",
                        "plan_file": path}
        self.recording = Recording(scheduler)
        scheduler.step = self.recording.step
        return _all_compute(timesteps)

    def call_ended(self) -> None:
        """A pipeline call has returned (its image decoded): a finished recording is kept, and the setup planned
        once it has `calibration` of them; a planned generation's time is kept for `stats`."""
        now = time.perf_counter()
        seconds = None if self._call_started is None else now - self._call_started
        self._call_started, self._first_call = None, True
        timing = self.timing.setdefault(self._path, {"full": [], "planned": []})
        if self.recording is None:
            if seconds is not None and self._path in self.plans:
                timing["planned"].append(seconds)
            return
        recording, self.recording = self.recording, None
        vars(recording.scheduler).pop("step", None)
        if seconds is None or not recording.outputs or len(recording.outputs) != len(recording.seconds):
            logger.warning("attnreuse: the denoiser and the sampler's steps did not pair up one to one in this "
                           "generation (two passes per step?); it cannot calibrate a first-use plan.")
            return
        recording.total_s = seconds - recording.overhead_s
        timing["full"].append(recording.total_s)
        kept = self.recordings.setdefault(self._path, [])
        kept.append(recording)
        if len(kept) >= self.calibration:
            self._plan(kept)

    def _plan(self, recordings: list[Recording]) -> None:
        """This setup's plan from its recordings, kept here and on disk; a budget no plan can meet leaves the setup
        on the full sampler (one warning; `stats` says why)."""
        del self.recordings[self._path]
        started = time.perf_counter()
        try:
            plan = plan_from_recordings(recordings, self.budget, self.target_psnr)
        except ValueError as err:
            logger.warning("attnreuse: %s It keeps the full sampler.", err)
            self.plans[self._path] = (None, f"none: {err}")
            return
        plan.meta.update(planning_s=time.perf_counter() - started, full_runs=len(recordings))
        plan = plan.at_timesteps([float(a["timestep"]) for a in recordings[0].arguments])
        self.plans[self._path] = (plan, "planned here at first use")
        if self.cache:
            write_entry(Path(self._path), self._key_now, plan)

    def stats(self) -> dict:
        timing = self.timing.get(self._path, {})
        measured = {}
        if timing.get("full") and timing.get("planned"):
            measured = {"measured_latency": statistics.median(timing["planned"]) / statistics.median(timing["full"]),
                        "timed_generations": {k: len(v) for k, v in timing.items()}}
        return {"plan_source": self.current["source"], **{k: v for k, v in self.current.items() if k != "source"},
                **measured}

    def close(self) -> None:
        """Reuse is removed: a recording in progress is dropped, its scheduler given back its own step."""
        self._drop_recording("the generation being recorded did not finish before reuse was removed")

    def _drop_recording(self, why: str) -> None:
        if self.recording is not None:
            vars(self.recording.scheduler).pop("step", None)
            self.recording = None
            logger.warning("attnreuse: %s; its recording is dropped.", why)

    def _key(self, num_calls: int, scheduler) -> dict:
        """What a first-use plan holds for (`plan_cache`). Not the resolution: a plan moved to twice the side kept
        within 1 dB of one made there on both default models (docs/RESULTS.md §9); the step count, sampler,
        guidance and batch did not always, so they stay in the key, as do the weights."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        sample, parameter = self._sample, next(self.model.parameters())
        config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
        return {"pipeline": type(self.pipe).__name__, "model": type(self.model).__name__,
                "weights": self._fingerprint, "scheduler": type(scheduler).__name__, "scheduler_config": config,
                "calls": num_calls, "guidance": getattr(self.pipe, "_guidance_scale", None),
                "batch": sample.shape[0] if sample is not None else None, "dtype": str(parameter.dtype),
                "device": parameter.device.type, "budget": self.budget, "target_psnr": self.target_psnr,
                "calibration": self.calibration}

    def _sync(self) -> None:
        if self._sample is not None and self._sample.is_cuda:
            torch.cuda.synchronize(self._sample.device)


def _all_compute(timesteps) -> Plan:
    """The full sampler, as the plan of a whole-call unit that computes every call."""
    return Plan({"call": Unit("call", (1,) * len(timesteps), "output")}, tuple(timesteps))


def _predicted(plan: Plan | None) -> dict:
    if plan is None:
        return {}
    return {k: plan.meta[k] for k in ("predicted_latency", "predicted_latent_psnr_db", "refreshes") if k in plan.meta}
