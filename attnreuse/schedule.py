"""Reuse schedules: which denoiser calls recompute attention maps and which reuse the cached ones.

A schedule is the paper's binary vector pi (Hunter, Dudziak et al. 2024, arXiv 2401.01008, sec. 2):
entry s is 1 when call s computes its maps and 0 when it reuses the map of the last compute call.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterable, Sequence
from pathlib import Path

from .files import atomic_write, parse_json_input

__all__ = ["Schedule", "as_schedule", "whole_number", "length_error"]

_JSON_KEYS = {"schedule", "timesteps", "meta"}


def whole_number(value, name: str, minimum: int = 0) -> int:
    """`value` as an int (Python or numpy integers, not bools or floats), at least `minimum`."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a whole number, got {value!r}.")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a whole number, got {type(value).__name__} {value!r}.") from None
    if number < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {number}.")
    return number


def _bits(bits) -> tuple[int, ...]:
    """A schedule's entries, each 0 or 1, the first 1."""
    if isinstance(bits, str):
        bits = [int(c) if c in "01" else c for c in bits.strip()]
    elif not isinstance(bits, Iterable):
        raise TypeError(f"A schedule is a sequence of 0/1 or a bit string like '1101', got {type(bits).__name__}.")
    bits = tuple(bits)
    if not bits:
        raise ValueError("A schedule needs at least one step; got an empty schedule.")
    for i, b in enumerate(bits):
        if isinstance(b, bool) or not hasattr(b, "__index__") or operator.index(b) not in (0, 1):
            raise ValueError(f"Schedule entries must be 1 (compute) or 0 (reuse); entry {i} is {b!r}.")
    if bits[0] != 1:
        raise ValueError("The first step of a schedule must compute (1): there is no attention map to reuse before it.")
    return tuple(operator.index(b) for b in bits)


def _timesteps(timesteps, count: int) -> tuple[float, ...] | None:
    """One finite timestep per step, or None."""
    if timesteps is None:
        return None
    if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Iterable):
        raise TypeError(f"A schedule's timesteps are a sequence of numbers, got {type(timesteps).__name__}.")
    values = []
    for i, t in enumerate(timesteps):
        if isinstance(t, bool) or not isinstance(t, (int, float)) and not hasattr(t, "__float__"):
            raise TypeError(f"Timestep {i} of the schedule is not a number: {t!r}.")
        if not math.isfinite(float(t)):
            raise ValueError(f"Timestep {i} of the schedule is not finite: {t!r}.")
        values.append(float(t))
    if len(values) != count:
        raise ValueError(f"A schedule of {count} steps needs {count} timesteps, got {len(values)}.")
    return tuple(values)


class Schedule:
    """A binary per-step reuse schedule, 1 = compute, 0 = reuse (the paper's pi).

    Args:
        bits (`Sequence[int]` or `str`): one entry per sampler step, e.g. ``[1, 1, 0, 0, 1, 0]`` or ``"110010"``.
        timesteps (`Sequence[float]`, *optional*): the timesteps (0-1000) the steps ran at. A schedule that
            carries its timesteps can be moved to another sampler or step count with `for_timesteps`,
            which `apply_attention_reuse` does by itself when the lengths do not match.
        meta (`dict`, *optional*): free-form metadata (how it was found, PSNR reached, ...), kept in JSON.

    >>> Schedule.hurry(6, 2)
    Schedule('111100')
    """

    __slots__ = ("bits", "timesteps", "meta")

    def __init__(self, bits: Sequence[int] | str, timesteps: Sequence[float] | None = None, meta: dict | None = None):
        if isinstance(bits, Schedule):
            timesteps = bits.timesteps if timesteps is None else timesteps
            meta = bits.meta if meta is None else meta
            bits = bits.bits
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"A schedule's meta is a dict, got {type(meta).__name__}.")
        self.bits: tuple[int, ...] = _bits(bits)
        self.timesteps: tuple[float, ...] | None = _timesteps(timesteps, len(self.bits))
        self.meta: dict = dict(meta or {})

    @classmethod
    def hurry(cls, num_steps: int, reuse_steps: int) -> Schedule:
        """HURRY (paper sec. 2.1): compute the first N - r steps, reuse the last r."""
        n, r = whole_number(num_steps, "num_steps", 1), whole_number(reuse_steps, "reuse_steps", 0)
        if r >= n:
            raise ValueError(f"HURRY needs 0 <= reuse_steps < num_steps (the first step must compute); got "
                             f"num_steps={n}, reuse_steps={r}.")
        return cls([1] * (n - r) + [0] * r, meta={"strategy": "hurry"})

    @classmethod
    def all_compute(cls, num_steps: int) -> Schedule:
        """No reuse at all: every step computes (the reference)."""
        return cls([1] * whole_number(num_steps, "num_steps", 1))

    @classmethod
    def from_json(cls, data: str | dict | Path) -> Schedule:
        """Read a schedule from a JSON string, a dict, or a path to a JSON file; errors name the file and field."""
        return parse_json_input(data, "schedule", cls._from_data, inline=("{", "["))

    @classmethod
    def _from_data(cls, data) -> Schedule:
        if isinstance(data, list):
            return cls(data)
        if not isinstance(data, dict) or "schedule" not in data:
            raise ValueError("a schedule JSON is a list of 0/1 or an object with a 'schedule' field.")
        unknown = sorted(set(data) - _JSON_KEYS)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; a schedule has {sorted(_JSON_KEYS)}.")
        for field, kind in (("schedule", (list, str)), ("timesteps", (list, type(None))), ("meta", (dict, type(None)))):
            if not isinstance(data.get(field), kind):
                raise TypeError(f"field '{field}' must be {' or '.join(k.__name__ for k in kind)}, got "
                                f"{type(data.get(field)).__name__}.")
        return cls(data["schedule"], data.get("timesteps"), data.get("meta"))

    def to_json(self, path: str | Path | None = None, indent: int | None = None) -> str:
        """The schedule as JSON (``{"schedule": [...], "timesteps": [...], "meta": {...}}``); written to `path`
        (atomically) if given."""
        text = json.dumps({"schedule": list(self.bits), "timesteps": self.timesteps and list(self.timesteps),
                           "meta": self.meta}, indent=indent)
        if path is not None:
            atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))
        return text

    def __len__(self) -> int:
        return len(self.bits)

    def __iter__(self):
        return iter(self.bits)

    def __getitem__(self, index):
        return self.bits[index]

    def __eq__(self, other) -> bool:
        if isinstance(other, Schedule):
            return self.bits == other.bits
        if isinstance(other, (list, tuple)):
            return self.bits == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.bits)

    def __repr__(self) -> str:
        return f"Schedule('{self}')"

    def __str__(self) -> str:
        """The bits, e.g. ``110010``."""
        return "".join(map(str, self.bits))

    @property
    def num_reuse(self) -> int:
        return len(self.bits) - sum(self.bits)

    def at_timesteps(self, timesteps: Iterable[float]) -> Schedule:
        """The same schedule, recording the timesteps (0-1000) its steps run at."""
        return Schedule(self.bits, [float(t) for t in timesteps], self.meta)

    def for_timesteps(self, timesteps: Iterable[float]) -> Schedule:
        """Resolve this schedule on another list of timesteps: each new step takes the entry of the nearest
        recorded timestep. This is how the paper moves a schedule between DDIM and DPM-Solver++ (sec. 3.1)."""
        if self.timesteps is None:
            raise ValueError(f"{self!r} has no timesteps, so it cannot be moved to other timesteps; record them "
                             "first with schedule.at_timesteps(scheduler.timesteps).")
        timesteps = [float(t) for t in timesteps]
        bits = [self.bits[min(range(len(self.timesteps)), key=lambda i: abs(self.timesteps[i] - t))] for t in timesteps]
        if bits and bits[0] != 1:
            bits[0] = 1  # the nearest source step of the first new step may be a reuse; nothing is cached yet
        return Schedule(bits, timesteps, dict(self.meta, moved_from=len(self)))

    def expand(self, num_calls: int, order: int = 1) -> Schedule:
        """Expand a schedule of N sampler steps to the model calls of a sampler of the given `order`.

        Second-order samplers (Heun, DPM2) call the model twice per step except the last step, so they make
        ``order * (N - 1) + 1`` calls; every call of step i follows entry i of the schedule.
        """
        n = len(self.bits)
        if num_calls == n:
            return self
        if order > 1 and num_calls == order * (n - 1) + 1:
            return Schedule([self.bits[min(c // order, n - 1)] for c in range(num_calls)], meta=self.meta)
        raise ValueError(length_error(n, num_calls, order))


def length_error(entries: int, num_calls: int, order: int = 1, what: str = "schedule") -> str:
    """What to say when a schedule (or plan) of `entries` entries meets a generation of `num_calls` calls."""
    accepted = f"{num_calls}"
    if order > 1 and (num_calls - 1) % order == 0:
        accepted += f" (one per model call) or {(num_calls - 1) // order + 1} (one per sampler step)"
    return (
        f"The {what} has {entries} entries but this generation makes {num_calls} denoiser calls; expected a {what} of "
        f"length {accepted}. Build it for the number of inference steps you run (for img2img, the steps left after "
        "`strength`), or record its timesteps (`at_timesteps`) so that it can be moved to other timesteps."
    )


def _hurry(value: str, num_steps: int | None) -> Schedule:
    parts = value.split(":")[1:]
    forms = "'hurry:NUM_STEPS:REUSE_STEPS'" + (" or 'hurry:REUSE_STEPS'" if num_steps is not None else "")
    if len(parts) == 1 and num_steps is not None:
        parts = [str(num_steps), *parts]
    try:
        n, r = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"Expected {forms}, got {value!r}.") from None
    return Schedule.hurry(n, r)


def as_schedule(value, num_steps: int | None = None) -> Schedule:
    """Accept a `Schedule`, a list of 0/1, a bit string like ``"110010"``, ``"hurry:N:R"``, ``"hurry:R"`` (with
    `num_steps`) or a JSON file path."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, str):
        if value.startswith("hurry:"):
            return _hurry(value, num_steps)
        if value.endswith(".json"):
            return Schedule.from_json(Path(value))
        return Schedule(value)
    if isinstance(value, (list, tuple)):
        return Schedule(value)
    raise TypeError(f"Cannot make a schedule from {type(value).__name__}; pass a Schedule, a list of 0/1, a bit "
                    "string, 'hurry:N:R' or the path of a schedule JSON.")
