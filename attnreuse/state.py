"""Where a generation stands: what each denoiser call does, which call this is, and where generations begin.

The tracker follows a `Plan`: at a generation's start it fits the plan to the generation's calls (expanded for
second-order samplers, moved by timestep where the lengths differ) and resolves it (`resolve`, given by the
handle) into per call one action per actor, and the slots to let go before the call. A step is one call of the
denoiser.

A new generation starts when the scheduler's `timesteps` is a new object (every pipeline call runs
`set_timesteps`), when the previous generation has made all its calls or was ended, or, for a bare model without a
scheduler, when the timestep goes back up. An explicit generation (`start(..., explicit=True)`) is ended only by
`end`.
"""

from __future__ import annotations

import logging
import threading

import torch

logger = logging.getLogger(__name__)

__all__ = ["COMPUTE", "STORE", "REUSE", "SKIP", "StepTracker"]

COMPUTE, STORE, REUSE = "compute", "store", "reuse"
SKIP = "skip"  # an actor that does not run at this call (inside a reused call, branch or block)


def _scalar(timestep) -> float | None:
    """The timestep of a denoiser call as a float (a batch of timesteps shares one value in a sampler)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)


class StepTracker:
    """The call index and actions of one handle's current generation (`now`: the current call's, one per actor),
    the thread it runs in, and how many generations the handle has seen."""

    def __init__(self, plan, resolve, get_scheduler=lambda: None):
        self.plan, self.resolve, self.get_scheduler = plan, resolve, get_scheduler
        self.planner = None  # planning at first use: picks the plan of each pipeline generation (`first_use`)
        self.reset()

    @property
    def call_mode(self) -> str | None:
        """The mode of the running plan's call unit (None: it has none)."""
        units = self.running.units.values() if self.running is not None else ()
        return next((u.mode for u in units if u.kind == "call"), None)

    @property
    def in_generation(self) -> bool:
        """Whether a generation has started and neither made all its calls nor been ended."""
        return bool(self.actions) and not (self._finished or self._ended)

    def before_call(self, timestep) -> bool:
        """Advance to the next denoiser call and pick its actions; True when a generation starts here."""
        started = self._starts_here(timestep)
        self.call += 1
        self.now = self.actions[self.call]
        return started

    @property
    def last_call(self) -> bool:
        """Whether the current call is its generation's last."""
        return self.call == len(self.actions) - 1

    def finish(self) -> None:
        """The generation has made all its calls: the next call starts another (an explicit one refuses it)."""
        self._finished = True

    def end(self) -> None:
        """The generation is over (its pipeline call returned, stopped or failed): the next call starts another."""
        self._ended, self.explicit, self.strict, self.owner = True, False, False, None

    def start(self, plan, explicit: bool = False) -> None:
        """A new generation following `plan` (fitted to its calls), run by the calling thread."""
        self.running = plan
        self.actions, self.drops = self.resolve(plan)
        self.call = -1
        self._finished, self._ended, self.explicit, self.owner = False, False, explicit, threading.get_ident()
        self.generations += 1

    def snapshot(self) -> tuple:
        return self.running, self.call, self._last_t

    def restore(self, snapshot: tuple, plan=None) -> None:
        """Continue from `snapshot` as an explicit generation, optionally with another plan that agrees with it on
        the calls made so far."""
        old, self.call, self._last_t = snapshot
        self.running = plan if plan is not None else old
        self.actions, self.drops = self.resolve(self.running)
        self._finished, self._ended, self.explicit, self.owner = False, False, True, threading.get_ident()

    def reset(self) -> None:
        self.running = None  # the plan of the current (or last) generation, fitted to its calls
        self.actions: list[tuple] = []
        self.drops: list[tuple] = []
        self.now: tuple = ()
        self.call, self.generations = -1, 0
        self.explicit, self.strict, self.owner = False, False, None  # strict: a pipeline loop delimits generations
        self._timesteps, self._last_t, self._finished, self._ended = None, None, False, False

    def _starts_here(self, timestep) -> bool:
        finished = self._finished or self._ended or self.call + 1 >= len(self.actions)
        if self.explicit:
            if finished:
                raise ValueError(f"attnreuse: this generation has made all {len(self.actions)} calls of its "
                                 "plan; a further denoiser call needs a new generation (leave "
                                 "`handle.generation()` first).")
            return False
        scheduler = self.get_scheduler()
        timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
        if timesteps is not None:
            if finished or timesteps is not self._timesteps:
                if self.strict and not finished:
                    raise RuntimeError("attnreuse: the scheduler's timesteps were replaced during a generation (by a "
                                       "second pipeline call, from another thread or a callback?); one patched "
                                       "pipeline runs one generation at a time.")
                self._timesteps = timesteps
                self.start(self._resolve(scheduler, timesteps, timestep))
                return True
            return False
        return self._bare_starts_here(_scalar(timestep), finished)

    def _bare_starts_here(self, t: float | None, finished: bool) -> bool:
        """A bare model: a generation starts when the timestep goes back up or the previous one ended; a timestep
        that keeps going down past the schedule's last entry is a length mismatch, not a new generation."""
        back_up = t is not None and self._last_t is not None and t > self._last_t
        if finished and not back_up and not self._ended and self.actions:
            raise ValueError(f"attnreuse: the schedule has {len(self.actions)} entries but the denoiser was called "
                             f"again (timestep {t} after {self._last_t}) in the same generation; build the schedule "
                             "(or plan) for the number of denoiser calls, or pass scheduler= to apply.")
        started = finished or back_up
        if back_up and not finished and not self._ended and self.actions:
            logger.warning("attnreuse: a generation ended after %d of its plan's %d calls (the timestep went back up "
                           "before the plan's end); build the plan for the loop's calls, or pass scheduler= to apply.",
                           self.call + 1, len(self.actions))
        if started:
            self.start(self.plan)
        self._last_t = t
        return started

    def _resolve(self, scheduler, timesteps, timestep):
        """The plan for this generation's model calls, from the scheduler's timesteps (checked here, before the
        first call runs)."""
        begin = getattr(scheduler, "begin_index", None)
        all_ts = [float(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]  # one sync
        if begin is None:  # a pipeline without set_begin_index: find where this generation enters the schedule
            t = _scalar(timestep)
            t = all_ts[0] if t is None else t
            # Flux-style transformers take the scheduler's timestep divided by 1000
            seen = (t, t * 1000) if t <= 1 < max(all_ts) else (t,)
            begin = min(range(len(all_ts)), key=lambda i: min(abs(all_ts[i] - v) for v in seen))
        call_ts = all_ts[begin:]
        if self.planner is not None:
            self.plan = self.planner(call_ts, scheduler)
        order = int(getattr(scheduler, "order", 1) or 1)
        try:
            return self.plan.expand(len(call_ts), order)
        except ValueError:
            if self.plan.timesteps is None:
                raise
        logger.info("attnreuse: moving the plan from %d to %d calls by timestep", len(self.plan), len(call_ts))
        return self.plan.for_timesteps(call_ts)
