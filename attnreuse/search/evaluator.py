"""The paper's utility of reuse schedules and plans, evaluated with shared prefixes.

The utility of a schedule (or plan) is the mean PSNR of its final images against the no-reuse images of the same
prompts and seeds (Hunter, Dudziak et al. 2024, sec. 3.1). Two candidates whose resolved per-call actions agree on
their first k calls produce the same latents, scheduler state and cache up to call k, so `Evaluator` runs the
candidates in sorted order and resumes each one from the deepest state it shares with the candidate before it (a
depth-first walk of the trie of plans): a PHAST sweep costs a fraction of its (N - r) * r full generations, and the
result is bit for bit what a full run gives. A search's state file (`write_state`, `read_state`: its
setup's key and what it has found) lets an interrupted search resume.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..files import read_json, write_json
from ..layers import denoiser
from ..pipelines.sampling import GenerationSetup, Sampling
from ..plan import Plan, Schedule, as_plan
from ..reuse import apply_reuse
from ..wrappers import sample_of
from .utility import mean_psnr

__all__ = ["Recording", "Evaluator", "model_name", "setup_key", "candidate_key", "read_state", "write_state",
           "PlanningError"]


class PlanningError(ValueError):
    """A search that cannot go on as asked (a budget below every plan, a state file that is damaged or from
    another setup): said in one line, with what to do."""


_PACKAGE = Path(__file__).resolve().parents[1]


def model_name(pipe) -> str:
    """The pipeline's hub id or folder, else its denoiser's class name; a folder inside the package (the default
    model) as `attnreuse:` and its path there, so that searches made in one checkout match in another."""
    name = str(getattr(pipe, "name_or_path", "") or type(denoiser(pipe)).__name__)
    try:
        return "attnreuse:" + Path(name).resolve().relative_to(_PACKAGE).as_posix()
    except ValueError:
        return name


def setup_key(setup: GenerationSetup) -> dict:
    """What a search on `setup` depends on: model, sampler, steps, guidance, calibration prompts and seeds."""
    return {"model": model_name(setup.pipe), "sampler": type(setup.pipe.scheduler).__name__,
            "num_inference_steps": setup.num_steps, "guidance_scale": setup.guidance, "prompts": setup.prompts,
            "seeds": setup.seeds}


def candidate_key(candidate) -> str:
    """How a candidate is known in a search's state: a schedule by its bits, a plan by its units as JSON."""
    value = as_plan(candidate)
    if isinstance(value, Schedule):
        return str(value)
    return json.dumps({name: unit.to_dict() for name, unit in value.units.items()}, sort_keys=True)


def read_state(path: Path, what: str, field: str) -> dict:
    """A search's state file (`write_state`'s), read back to resume: a JSON object whose `field` is an object."""
    start_over = f"use another --state file or delete {path} to start over"
    try:
        saved = read_json(path, what)
    except ValueError as err:
        raise PlanningError(f"{str(err).rstrip('.')}: it is damaged; {start_over}.") from None
    if not isinstance(saved, dict) or not isinstance(saved.get(field), dict):
        raise PlanningError(f"{path} is not a {what} (no '{field}' object); {start_over}.")
    return saved


def check_setup(path: Path, saved: dict, key: dict) -> None:
    """A state file resumes only the search it was written for: refused, naming what differs."""
    if saved.get("setup") != key:
        other = saved.get("setup") if isinstance(saved.get("setup"), dict) else {}
        differs = [f"{k} {other.get(k)!r} there, {v!r} here" for k, v in key.items() if other.get(k) != v]
        raise PlanningError(f"{path} was written for another search setup ({'; '.join(differs) or 'no setup'}); "
                            f"use another --state file or delete {path} to start over.")


def write_state(path: Path | None, setup: dict, **fields) -> None:
    """A search's state, written (atomically) as it goes where `path` is given: its setup's key and `fields`."""
    if path is not None:
        write_json(path, {"setup": setup, **fields})


class Recording:
    """The input, raw output and wall time of each denoiser call made inside the block (the reference run)."""

    def __init__(self, model):
        self.model, self.inputs, self.outputs, self.seconds = model, [], [], []
        self.states: list = []  # (latents, scheduler) after each call, set by the evaluator

    def __enter__(self):
        clock = []

        def before(module, args, kwargs):
            self.inputs.append(args[0] if args else kwargs.get("sample", kwargs.get("hidden_states")))
            clock.append(time.perf_counter())

        self._hooks = [self.model.register_forward_pre_hook(before, with_kwargs=True),
                       self.model.register_forward_hook(lambda m, a, out: self._keep(out, clock[-1]))]
        return self

    def _keep(self, output, started: float) -> None:
        self.outputs.append(sample_of(output).detach().clone())
        self.seconds.append(time.perf_counter() - started)

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()


class Evaluator:
    """Mean PSNR of reuse schedules on a calibration set, against the no-reuse images (computed once).

    Args:
        setup (`GenerationSetup`): the pipeline (its scheduler is the sampler searched for), the calibration prompts
            and seeds (image i is prompt i with the noise the pipeline draws from seeds[i]; all in one batch), the
            step count and guidance scale.
        state_file (*optional*): JSON where every utility is written as soon as it is known; an interrupted
            search run again with the same file skips what was done.
        record (*optional*): keep the reference run's inputs, outputs, call times and states (`reference`, a
            `Recording`), which the quick planner replays.

    `calls` counts denoiser calls (each over the whole batch); `naive_calls` what full generations would cost.
    """

    def __init__(self, setup: GenerationSetup, state_file: str | Path | None = None, progress: bool = False,
                 record: bool = False):
        self.setup, self.progress = setup, progress
        self.calls, self.naive_calls = 0, 0
        self.utilities: dict[str, float] = {}
        self.state_file = Path(state_file) if state_file else None
        if self.state_file and self.state_file.exists():
            self._resume()
        self._prepare()
        self._path: tuple = ()  # the actors' signature, and (actions, state after them) along the last run
        self.reference = Recording(self.sampling.model) if record else None  # what the quick planner replays
        with self.reference or contextlib.nullcontext():
            latents = self._run(Schedule.all_compute(setup.num_steps), count=False)
        if record:
            self.reference.states = [(state[0], state[1]) for _, state in self._path[1]]
        self.references = self._final_images(latents)

    @property
    def key(self) -> dict:
        """What the utilities depend on (a resumed search must match it)."""
        return setup_key(self.setup)

    def _resume(self) -> None:
        saved = read_state(self.state_file, "search state file", "utilities")
        start_over = f"use another --state file or delete {self.state_file} to start over"
        check_setup(self.state_file, saved, self.key)
        bad = [k for k, v in saved["utilities"].items()
               if not _known(k, self.setup.num_steps) or not isinstance(v, (int, float)) or isinstance(v, bool)
               or not math.isfinite(v)]
        if bad:
            raise PlanningError(f"{self.state_file}: field 'utilities' has invalid entries {bad[:3]}; {start_over}.")
        self.utilities = {k: float(v) for k, v in saved["utilities"].items()}
        self.calls, self.naive_calls = int(saved.get("calls", 0)), int(saved.get("naive_calls", 0))

    @torch.no_grad()
    def _prepare(self) -> None:
        self.sampling = Sampling(self.setup)
        self.timesteps = self.sampling.timesteps

    def _final_images(self, latents) -> np.ndarray:
        return self.sampling.images(latents)

    @torch.no_grad()
    def _run(self, candidate, count=True):
        """Final latents of one schedule or plan, resumed from the deepest state shared with the previous run."""
        model = self.sampling.model
        with apply_reuse(model, candidate) as handle:
            actions, signature = handle.tracker.resolve(handle.plan)[0], _signature(handle)
            depth = 0
            if self._path and self._path[0] == signature:
                steps = self._path[1]
                while depth < min(len(steps), len(actions) - 1) and steps[depth][0] == actions[depth]:
                    depth += 1
                del steps[depth:]
            else:
                self._path = (signature, [])
            steps = self._path[1]
            latents, scheduler, resume = steps[-1][1] if depth else (*self.sampling.start, None)
            scheduler = copy.deepcopy(scheduler)
            with handle.generation(handle.plan, resume=resume):
                for s in range(depth, len(actions)):
                    latents = self.sampling.step(model, scheduler, latents, self.timesteps[s])
                    steps.append((actions[s], (latents, copy.deepcopy(scheduler), handle.snapshot())))
        self.calls += (len(actions) - depth) if count else 0
        return latents

    def __call__(self, candidates) -> list[float]:
        """Utilities of schedules or plans (known ones are not run again), running the new ones in sorted order."""
        values = [as_plan(c) for c in candidates]
        for value in values:
            if len(value) != self.setup.num_steps:
                raise ValueError(f"{value!r} has {len(value)} entries; this search runs {self.setup.num_steps} steps.")
        todo = {candidate_key(v): v for v in values if candidate_key(v) not in self.utilities}
        for key, value in tqdm(sorted(todo.items(), key=lambda kv: _order(kv[1])), desc="candidates",
                               disable=not self.progress, dynamic_ncols=True):
            self.utilities[key] = mean_psnr(self._final_images(self._run(value)), self.references)
            self.naive_calls += self.setup.num_steps
            self._save()
        return [self.utilities[candidate_key(v)] for v in values]

    def trajectory(self, candidate) -> list[torch.Tensor]:
        """The latents after each call of a schedule or plan (shared prefixes are not run again)."""
        self._run(as_plan(candidate))
        return [state[0] for _, state in self._path[1]]

    def _save(self) -> None:
        write_state(self.state_file, self.key, utilities=self.utilities, calls=self.calls,
                    naive_calls=self.naive_calls)

    def describe(self, schedule: Schedule, **meta) -> Schedule:
        """The schedule with its timesteps and the search's metadata, as `Schedule.to_json` writes it."""
        info = dict(self.key, psnr_db=self([schedule])[0], evaluations=len(self.utilities),
                    model_calls=self.calls, naive_model_calls=self.naive_calls, **meta)
        return Schedule(schedule.bits, [float(t) for t in self.timesteps], dict(schedule.meta, **info))


def _signature(handle) -> tuple:
    """The actors whose actions a handle's calls carry, and what each unit keeps: runs share states only between
    equal signatures."""
    kinds = tuple(sorted((u.kind, u.mode, u.layers or ()) for u in handle.plan.units.values()))
    return tuple(handle.cache.layers), tuple(handle.layout.modules), kinds


def _order(value) -> tuple:
    """Candidates sorted so that those sharing prefixes of actions run one after another (schedules by their
    lookahead actions, as before; plans by their units' bits, call by call)."""
    if isinstance(value, Schedule):
        return (0, "", tuple(zip(value.bits, value.bits[1:] + (1,))))
    units = sorted(value.units.items())
    per_call = tuple(tuple((u.bits[c], u.depths[c] if u.depths else 0) for _, u in units) for c in range(len(value)))
    return (1, ",".join(name for name, _ in units), per_call)


def _known(key: str, num_steps: int) -> bool:
    """Whether a state file's key names a candidate of `num_steps` calls."""
    try:
        value = Schedule(key) if not key.startswith("{") else Plan({k: v for k, v in json.loads(key).items()})
    except (ValueError, TypeError):
        return False
    return len(value) == num_steps
