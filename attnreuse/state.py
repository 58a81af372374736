"""Where a generation stands: what each denoiser call does, which call this is, and where generations begin.

A step is one call of the denoiser. A new generation starts when the scheduler's `timesteps` is a new object
(every pipeline call runs `set_timesteps`), when the previous generation has made all its calls or was ended, or,
for a bare model without a scheduler, when the timestep goes back up. An explicit generation (`start(...,
explicit=True)`) is ended only by `end`.
"""

from __future__ import annotations

import logging
import threading

import torch

from .schedule import Schedule

logger = logging.getLogger(__name__)

__all__ = ["COMPUTE", "STORE", "REUSE", "call_actions", "StepTracker"]

COMPUTE, STORE, REUSE = "compute", "store", "reuse"


def call_actions(bits: tuple[int, ...]) -> tuple[str, ...]:
    """Per call: REUSE at a 0, STORE at a 1 whose next call reuses (lookahead), else COMPUTE."""
    last = len(bits) - 1
    return tuple(
        REUSE if b == 0 else STORE if s < last and bits[s + 1] == 0 else COMPUTE for s, b in enumerate(bits)
    )


def _scalar(timestep) -> float | None:
    """The timestep of a denoiser call as a float (a batch of timesteps shares one value in a sampler)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)


class StepTracker:
    """The call index and action of one handle's current generation, the thread it runs in, and how many
    generations the handle has seen."""

    def __init__(self, schedule: Schedule, get_scheduler=lambda: None):
        self.schedule = schedule
        self.get_scheduler = get_scheduler
        self.reset()

    @property
    def in_generation(self) -> bool:
        """Whether a generation has started and neither made all its calls nor been ended."""
        return bool(self.actions) and not (self._finished or self._ended)

    def before_call(self, timestep) -> bool:
        """Advance to the next denoiser call and pick its action; True when a generation starts here."""
        started = self._starts_here(timestep)
        self.call += 1
        self.action = self.actions[self.call]
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

    def start(self, bits: tuple[int, ...], explicit: bool = False) -> None:
        """A new generation with these bits, run by the calling thread."""
        self.bits, self.actions = tuple(bits), call_actions(tuple(bits))
        self.call = -1
        self._finished, self._ended, self.explicit, self.owner = False, False, explicit, threading.get_ident()
        self.generations += 1

    def snapshot(self) -> tuple:
        return self.bits, self.call, self._last_t

    def restore(self, snapshot: tuple, bits: tuple[int, ...] | None = None) -> None:
        """Continue from `snapshot` as an explicit generation, optionally with other bits that agree with it on the
        calls made so far."""
        old, self.call, self._last_t = snapshot
        self.bits = tuple(bits) if bits is not None else old
        self.actions = call_actions(self.bits)
        self._finished, self._ended, self.explicit, self.owner = False, False, True, threading.get_ident()

    def reset(self) -> None:
        self.bits: tuple[int, ...] = ()
        self.actions: tuple[str, ...] = ()
        self.call, self.action, self.generations = -1, COMPUTE, 0
        self.explicit, self.strict, self.owner = False, False, None  # strict: a pipeline loop delimits generations
        self._timesteps, self._last_t, self._finished, self._ended = None, None, False, False

    def _starts_here(self, timestep) -> bool:
        finished = self._finished or self._ended or self.call + 1 >= len(self.actions)
        if self.explicit:
            if finished:
                raise ValueError(f"attnreuse: this generation has made all {len(self.actions)} calls of its "
                                 "schedule; a further denoiser call needs a new generation (leave "
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
                             f"again (timestep {t} after {self._last_t}) in the same generation; build the "
                             "schedule for the number of denoiser calls, or pass scheduler= to apply.")
        started = finished or back_up
        if started:
            self.start(self.schedule.bits)
        self._last_t = t
        return started

    def _resolve(self, scheduler, timesteps, timestep) -> tuple[int, ...]:
        """The schedule for this generation's model calls, from the scheduler's timesteps (checked here, before
        the first call runs)."""
        begin = getattr(scheduler, "begin_index", None)
        all_ts = [float(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]  # one sync
        if begin is None:  # img2img without set_begin_index: find where this generation enters the schedule
            t = _scalar(timestep)
            t = all_ts[0] if t is None else t
            begin = min(range(len(all_ts)), key=lambda i: abs(all_ts[i] - t))
        call_ts = all_ts[begin:]
        order = int(getattr(scheduler, "order", 1) or 1)
        try:
            return self.schedule.expand(len(call_ts), order).bits
        except ValueError:
            if self.schedule.timesteps is None:
                raise
        logger.info("attnreuse: moving %r from %d to %d steps by timestep", self.schedule, len(self.schedule),
                    len(call_ts))
        return self.schedule.for_timesteps(call_ts).bits
