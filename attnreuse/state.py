"""Where a generation stands: what each denoiser call does, which call this is, and where generations begin.

A step is one call of the denoiser. A new generation starts when the scheduler's `timesteps` is a new object
(every pipeline call runs `set_timesteps`), when the previous generation has made all its calls or was ended, or,
for a bare model without a scheduler, when the timestep goes back up.
"""

from __future__ import annotations

import logging

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
    """The call index and action of one handle's current generation, and how many generations it has seen."""

    def __init__(self, schedule: Schedule, get_scheduler=lambda: None):
        self.schedule = schedule
        self.get_scheduler = get_scheduler
        self.reset()

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

    def end(self) -> None:
        """The generation is over (its pipeline call returned or stopped): the next call starts another."""
        self._ended, self.explicit = True, False

    def start(self, bits: tuple[int, ...], explicit: bool = False) -> None:
        """A new generation with these bits; an `explicit` one is not ended by detection, only by `end`."""
        self.actions = call_actions(tuple(bits))
        self.call = -1
        self._ended, self.explicit = False, explicit
        self.generations += 1

    def snapshot(self) -> tuple:
        return self.actions, self.call, self._last_t

    def restore(self, snapshot: tuple, actions: tuple[str, ...] | None = None) -> None:
        """Continue from `snapshot` as an explicit generation, optionally with other actions that agree with it on
        the calls made so far."""
        self.actions, self.call, self._last_t = snapshot
        self._ended, self.explicit = False, True
        if actions is not None:
            self.actions = actions

    def reset(self) -> None:
        self.actions: tuple[str, ...] = ()
        self.call, self.action, self.generations, self.explicit = -1, COMPUTE, 0, False
        self._timesteps, self._last_t, self._ended = None, None, False

    def _starts_here(self, timestep) -> bool:
        if self.explicit:
            if self.call + 1 >= len(self.actions):
                raise ValueError(f"attnreuse: this generation has made all {len(self.actions)} calls of its schedule; "
                                 "a further denoiser call needs a new generation (leave `handle.generation()` first).")
            return False
        scheduler = self.get_scheduler()
        timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
        finished = self._ended or self.call + 1 >= len(self.actions)
        if timesteps is not None:
            if finished or timesteps is not self._timesteps:
                self._timesteps = timesteps
                self.start(self._resolve(scheduler, timesteps, timestep))
                return True
            return False
        t = _scalar(timestep)  # bare model: one read of the timestep per call
        started = finished or (t is not None and self._last_t is not None and t > self._last_t)
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
