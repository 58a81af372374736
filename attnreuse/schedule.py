"""The paper's schedule: the bits of one unit of a plan, and how they fit a generation's calls.

A schedule is the binary vector pi of Hunter, Dudziak et al. 2024 (arXiv 2401.01008, sec. 2): entry s is 1 when
call s computes and 0 when it reuses what the last computing call kept. Every unit of a `Plan` has one. These are
pure functions of bits, timesteps and call counts; `Plan` builds on them.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable

__all__ = ["whole_number", "parse_bits", "parse_timesteps", "hurry_bits", "nearest_entries", "expanded_entries",
           "length_error"]


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


def parse_bits(bits) -> tuple[int, ...]:
    """A schedule's entries as a tuple, each 0 or 1 and the first 1; a bit string like ``"1101"`` is accepted."""
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


def parse_timesteps(timesteps, count: int) -> tuple[float, ...] | None:
    """One finite timestep per call, or None."""
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


def hurry_bits(num_steps: int, reuse_steps: int) -> tuple[int, ...]:
    """HURRY (paper sec. 2.1): compute the first N - r steps, reuse the last r."""
    n, r = whole_number(num_steps, "num_steps", 1), whole_number(reuse_steps, "reuse_steps", 0)
    if r >= n:
        raise ValueError(f"HURRY needs 0 <= reuse_steps < num_steps (the first step must compute); got "
                         f"num_steps={n}, reuse_steps={r}.")
    return (1,) * (n - r) + (0,) * r


def nearest_entries(recorded, timesteps) -> list[int]:
    """For each new timestep, the entry whose recorded timestep is nearest: how the paper moves a schedule between
    DDIM and DPM-Solver++ (sec. 3.1). Timesteps on the 0-1 scale of flow matching meet ones on the 0-1000 scale
    on the latter; timesteps that do not overlap the recorded ones at all are refused (nearest would be one end)."""
    recorded, timesteps = [float(t) for t in recorded], [float(t) for t in timesteps]
    if max(map(abs, recorded)) <= 1 < max(map(abs, timesteps)):
        recorded = [t * 1000 for t in recorded]
    elif max(map(abs, timesteps)) <= 1 < max(map(abs, recorded)):
        timesteps = [t * 1000 for t in timesteps]
    if max(timesteps) < min(recorded) or min(timesteps) > max(recorded):
        raise ValueError(f"the plan's timesteps ({min(recorded):g} to {max(recorded):g}) and this run's "
                         f"({min(timesteps):g} to {max(timesteps):g}) do not overlap, so the plan cannot be placed "
                         "by timestep; make the plan for this sampler.")
    return [min(range(len(recorded)), key=lambda i: abs(recorded[i] - t)) for t in timesteps]


def expanded_entries(entries: int, num_calls: int, order: int = 1) -> list[int] | None:
    """The entry each call follows when a schedule of N sampler steps meets `num_calls` calls of a sampler of
    `order` (Heun and DPM2 call the model twice a step except the last: 2(N - 1) + 1 calls); None if it cannot."""
    if num_calls == entries:
        return list(range(entries))
    if order > 1 and num_calls == order * (entries - 1) + 1:
        return [min(c // order, entries - 1) for c in range(num_calls)]
    return None


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

