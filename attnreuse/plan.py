"""Reuse plans: per denoiser call, what each unit of the denoiser computes and what it reuses.

A plan generalises the paper's schedule (Hunter, Dudziak et al. 2024) from "which calls reuse attention maps" to
every granularity at which a denoiser's work can be reused across calls. Each unit has a schedule, one bit per
call (1 = compute, 0 = reuse):

attention  attention layers (name patterns) reuse their map, Q and K, or output (`mode`), as a schedule does.
blocks     transformer blocks (`Transformer2DModel` in a UNet) reuse their residual: output minus input of their
           last compute call, added to the fresh input.
branch     the UNet's body below a depth, as DeepCache does: at a reuse call only the last `depths[c]` up layers
           (and the down layers feeding them) run; the rest return what they computed at the last compute call.
call       the whole denoiser call: its output (`mode="output"`) or its residual (`"residual"`) is reused.

Units nest: when the call unit reuses, nothing inside runs; when the branch reuses, units inside its skipped part
do not run at that call. The first call computes everything. The paper's schedules are plans with one attention
unit (`Plan.attention`, `Plan.hurry`); `Schedule` is that plan under its first name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from .files import atomic_write, parse_json_input
from .schedule import (
    expanded_entries,
    hurry_bits,
    length_error,
    nearest_entries,
    parse_bits,
    parse_timesteps,
    whole_number,
)

__all__ = ["Unit", "Plan", "Schedule", "as_plan", "as_schedule", "KINDS", "PLAN_FORMAT", "PLAN_VERSION"]

PLAN_FORMAT, PLAN_VERSION = "attnreuse-plan", 1
KINDS = ("attention", "blocks", "branch", "call")
_MODES = {"attention": ("map", "qk", "output", "auto"), "call": ("output", "residual"), "blocks": ("residual",),
          "branch": ("output",)}
_UNIT_KEYS = {"kind", "bits", "mode", "layers", "depths"}
_PLAN_KEYS = {"format", "version", "units", "timesteps", "meta"}
_SCHEDULE_KEYS = {"schedule", "timesteps", "meta"}  # the schedule JSON of attnreuse 0.1


@dataclass(frozen=True)
class Unit:
    """One unit of a plan: its kind, its schedule (one bit per call, 1 compute, 0 reuse) and what its reuse keeps."""

    kind: str
    bits: tuple[int, ...]
    mode: str | None = None  # attention: map, qk, output, auto; call: output, residual
    layers: tuple[str, ...] | None = None  # attention, blocks: layer names or glob patterns (None: every layer)
    depths: tuple[int, ...] | None = None  # branch: up layers that run at each reuse call (ignored at computes)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unit kind must be one of {KINDS}, got {self.kind!r}.")
        object.__setattr__(self, "bits", parse_bits(self.bits))
        mode = self.mode if self.mode is not None else _MODES[self.kind][0]
        if mode not in _MODES[self.kind]:
            raise ValueError(f"a {self.kind} unit's mode must be one of {_MODES[self.kind]}, got {self.mode!r}.")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "layers", _checked_layers(self.layers))
        object.__setattr__(self, "depths", self._checked_depths())

    def _checked_depths(self):
        if self.kind != "branch":
            if self.depths is not None:
                raise ValueError(f"only a branch unit has depths; this is a {self.kind} unit.")
            return None
        if self.depths is None or isinstance(self.depths, str) or len(self.depths) != len(self.bits):
            raise ValueError(f"a branch unit needs one depth per call ({len(self.bits)}), got {self.depths!r}.")
        return tuple(whole_number(d, "a branch depth", 0) for d in self.depths)

    def to_dict(self) -> dict:
        data = {"kind": self.kind, "bits": "".join(map(str, self.bits)), "mode": self.mode}
        if self.layers is not None:
            data["layers"] = list(self.layers)
        if self.depths is not None:
            data["depths"] = list(self.depths)
        return data

    def select(self, calls: list[int]) -> Unit:
        """The unit at these calls (each an index into this unit's calls), the first made a compute."""
        bits = [self.bits[c] for c in calls]
        bits[0] = 1
        depths = None if self.depths is None else [self.depths[c] for c in calls]
        return replace(self, bits=tuple(bits), depths=depths)


def _checked_layers(layers) -> tuple[str, ...] | None:
    """A unit's layer names or patterns as a tuple; an empty list selects nothing and is refused."""
    if layers is None:
        return None
    if isinstance(layers, str) or not all(isinstance(p, str) and p for p in layers):
        raise TypeError(f"a unit's layers are a list of names or patterns, got {layers!r}.")
    if not layers:
        raise ValueError("a unit's layers [] select no layer; leave 'layers' out for every layer.")
    return tuple(layers)


@dataclass(frozen=True)
class Plan:
    """Per denoiser call, what each unit computes or reuses; `timesteps` (the scheduler's) let it move to other
    samplers and step counts.

    >>> Plan.deepcache(6, interval=3, depth=1).units["branch"].bits
    (1, 0, 0, 1, 0, 0)
    >>> Plan.hurry(6, 2, mode="qk").units["attention"].bits
    (1, 1, 1, 1, 0, 0)
    """

    units: dict[str, Unit]
    timesteps: tuple[float, ...] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.units, dict) or not self.units:
            raise ValueError("a plan needs at least one unit.")
        units = {}
        for name, unit in self.units.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"unit names are non-empty strings, got {name!r}.")
            units[name] = unit if isinstance(unit, Unit) else _unit(name, unit)
        lengths = {len(u.bits) for u in units.values()}
        if len(lengths) != 1:
            raise ValueError(f"every unit needs one bit per call; the units have {sorted(lengths)} bits.")
        for kind in ("branch", "call"):
            if sum(u.kind == kind for u in units.values()) > 1:
                raise ValueError(f"a plan has at most one {kind} unit.")
        object.__setattr__(self, "units", units)
        object.__setattr__(self, "timesteps", parse_timesteps(self.timesteps, lengths.pop()))
        if not isinstance(self.meta, dict):
            raise TypeError(f"a plan's meta is a dict, got {type(self.meta).__name__}.")

    def __len__(self) -> int:
        return len(next(iter(self.units.values())).bits)

    def __str__(self) -> str:
        return "; ".join(f"{name} {''.join(map(str, u.bits))}" for name, u in self.units.items())

    @property
    def bits(self) -> tuple[int, ...]:
        """The schedule of a one-unit plan (the paper's pi for an attention plan)."""
        if len(self.units) != 1:
            raise ValueError(f"this plan has {len(self.units)} units ({', '.join(self.units)}); read the bits of one "
                             "with plan.units[name].bits.")
        return next(iter(self.units.values())).bits

    # constructors: the paper's schedules, DeepCache, no reuse

    @classmethod
    def attention(cls, bits, mode: str = "map", layers=None, timesteps=None, meta: dict | None = None) -> Plan:
        """The paper's plan: attention layers (all, or `layers`) reuse their `mode` (map, qk, output, auto) by the
        schedule `bits` (a PHAST result, HURRY, or any bit string)."""
        return cls({"attention": Unit("attention", bits, mode, layers)}, timesteps, dict(meta or {}))

    @classmethod
    def hurry(cls, num_steps: int, reuse_steps: int, mode: str = "map", layers=None) -> Plan:
        """HURRY (paper sec. 2.1): attention computes the first N - r steps and reuses at the last r."""
        return cls.attention(hurry_bits(num_steps, reuse_steps), mode, layers, meta={"strategy": "hurry"})

    @classmethod
    def deepcache(cls, num_steps: int, interval: int, depth: int = 1) -> Plan:
        """DeepCache (Ma et al. 2024) as a plan: the full UNet every `interval` calls, between them only the last
        `depth` up layers (DeepCache's branch 0 is depth 1)."""
        n, k = whole_number(num_steps, "num_steps", 1), whole_number(interval, "interval", 1)
        bits = [1 if c % k == 0 else 0 for c in range(n)]
        return cls({"branch": Unit("branch", bits, depths=[depth] * n)},
                   meta={"strategy": "deepcache", "interval": k, "depth": depth})

    @classmethod
    def all_compute(cls, num_steps: int) -> Plan:
        """No reuse: every call computes (the reference)."""
        return cls({"call": Unit("call", [1] * whole_number(num_steps, "num_steps", 1))})

    @classmethod
    def from_json(cls, data) -> Plan:
        """A plan from a JSON string, dict or file (a plan, or a schedule as attnreuse 0.1 wrote it); errors name
        the file and the field."""
        return parse_json_input(data, "plan", cls._from_data, inline=("{", "["))

    @classmethod
    def _from_data(cls, data) -> Plan:
        if isinstance(data, list) or isinstance(data, dict) and "schedule" in data and "format" not in data:
            return _schedule_from_data(data)
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a plan (a JSON object with \"format\": \"{PLAN_FORMAT}\", or a schedule).")
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {data.get('version')!r}; this attnreuse reads version {PLAN_VERSION}.")
        unknown = sorted(set(data) - _PLAN_KEYS)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; a plan has {sorted(_PLAN_KEYS)}.")
        if not isinstance(data.get("units"), dict):
            raise TypeError("field 'units' must be an object of named units.")
        return cls(data["units"], data.get("timesteps"), data.get("meta") or {})

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION,
                "units": {name: u.to_dict() for name, u in self.units.items()},
                "timesteps": None if self.timesteps is None else list(self.timesteps), "meta": self.meta}

    def to_json(self, path=None, indent: int | None = 1) -> str:
        """The plan as JSON; written to `path` (atomically) if given."""
        return _written(json.dumps(self.to_dict(), indent=indent, allow_nan=False), path)

    # moving a plan to other calls

    def at_timesteps(self, timesteps) -> Plan:
        """The same plan, recording the timesteps its calls run at."""
        return self._remade(self.units, tuple(float(t) for t in timesteps), self.meta)

    def for_timesteps(self, timesteps) -> Plan:
        """This plan on other timesteps: each new call takes the actions of the nearest recorded timestep."""
        if self.timesteps is None:
            raise ValueError("this plan has no timesteps, so it cannot be moved to other timesteps; record them "
                             "with plan.at_timesteps(scheduler.timesteps).")
        timesteps = [float(t) for t in timesteps]
        if not timesteps:
            raise ValueError("for_timesteps needs at least one timestep, got none.")
        nearest = nearest_entries(self.timesteps, timesteps)
        units = {name: u.select(nearest) for name, u in self.units.items()}
        return self._remade(units, timesteps, dict(self.meta, moved_from=len(self)))

    def expand(self, num_calls: int, order: int = 1) -> Plan:
        """This plan of N sampler steps on a sampler that calls the model `order` times a step (2N - 1 calls for
        Heun and DPM2); every call of step i follows entry i."""
        if num_calls == len(self):
            return self
        calls = expanded_entries(len(self), num_calls, order)
        if calls is None:
            what = "schedule" if set(self.units) == {"attention"} else "plan"
            raise ValueError(length_error(len(self), num_calls, order, what))
        return self._remade({name: u.select(calls) for name, u in self.units.items()}, None, self.meta)

    def _remade(self, units: dict, timesteps, meta: dict) -> Plan:
        return Plan(units, timesteps, meta)


class Schedule(Plan):
    """The paper's schedule under its first name: a plan written as bits for the attention maps, one attention unit
    whose mode and layers `apply_reuse`'s options choose (maps of every layer by default). Plans and the
    constructors `Plan.attention` / `Plan.hurry` say the same with the mode in the plan; this class keeps code
    written against attnreuse 0.1 working, list-like as it was.

    >>> Schedule.hurry(6, 2)
    Schedule('111100')
    """

    def __init__(self, bits, timesteps=None, meta: dict | None = None):
        if isinstance(bits, Plan):
            timesteps = bits.timesteps if timesteps is None else timesteps
            meta = bits.meta if meta is None else meta
            bits = bits.bits
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"A schedule's meta is a dict, got {type(meta).__name__}.")
        super().__init__({"attention": Unit("attention", bits)}, timesteps, dict(meta or {}))

    @classmethod
    def hurry(cls, num_steps: int, reuse_steps: int) -> Schedule:
        """HURRY (paper sec. 2.1): compute the first N - r steps, reuse the last r."""
        return cls(hurry_bits(num_steps, reuse_steps), meta={"strategy": "hurry"})

    @classmethod
    def all_compute(cls, num_steps: int) -> Schedule:
        return cls([1] * whole_number(num_steps, "num_steps", 1))

    @classmethod
    def from_json(cls, data) -> Schedule:
        return cls(Plan.from_json(data))

    def to_json(self, path=None, indent: int | None = None) -> str:
        """The schedule as JSON (``{"schedule": [...], "timesteps": [...], "meta": {...}}``), which every version
        reads; written to `path` (atomically) if given."""
        data = {"schedule": list(self.bits), "timesteps": self.timesteps and list(self.timesteps), "meta": self.meta}
        return _written(json.dumps(data, indent=indent), path)

    def _remade(self, units: dict, timesteps, meta: dict) -> Schedule:
        return Schedule(units["attention"].bits, timesteps, meta)

    @property
    def num_reuse(self) -> int:
        return len(self) - sum(self.bits)

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


def _unit(name: str, data) -> Unit:
    if not isinstance(data, dict):
        raise TypeError(f"unit {name!r} must be an object, got {type(data).__name__}.")
    unknown = sorted(set(data) - _UNIT_KEYS)
    if unknown:
        raise ValueError(f"unit {name!r} has unknown field(s) {unknown}; a unit has {sorted(_UNIT_KEYS)}.")
    try:
        return Unit(data.get("kind"), data.get("bits"), data.get("mode"), data.get("layers"), data.get("depths"))
    except (TypeError, ValueError) as err:
        raise type(err)(f"unit {name!r}: {err}") from None


def _schedule_from_data(data) -> Schedule:
    """A schedule's JSON: a list of 0/1, or {"schedule": [...], "timesteps": [...], "meta": {...}}."""
    if isinstance(data, list):
        return Schedule(data)
    unknown = sorted(set(data) - _SCHEDULE_KEYS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; a schedule has {sorted(_SCHEDULE_KEYS)}.")
    for key, kind in (("schedule", (list, str)), ("timesteps", (list, type(None))), ("meta", (dict, type(None)))):
        if not isinstance(data.get(key), kind):
            raise TypeError(f"field '{key}' must be {' or '.join(k.__name__ for k in kind)}, got "
                            f"{type(data.get(key)).__name__}.")
    return Schedule(data["schedule"], data.get("timesteps"), data.get("meta"))



def _written(text: str, path) -> str:
    if path is not None:
        atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))
    return text


def as_plan(value, num_steps: int | None = None) -> Plan:
    """A `Plan` as given, or one parsed from any form users write: a plan or schedule JSON file, a bit string like
    ``"110010"`` or a list of 0/1, ``"hurry:N:R"``, or ``"hurry:R"`` with `num_steps`. What is written as a schedule
    comes back a `Schedule`: apply's `mode` and `layers` choose what its attention unit reuses."""
    if isinstance(value, Plan):
        return value
    if isinstance(value, Path) or isinstance(value, str) and value.endswith(".json"):
        return Plan.from_json(Path(value))
    if isinstance(value, str) and value.startswith("hurry:"):
        return Schedule.hurry(*_hurry_numbers(value, num_steps))
    if isinstance(value, (str, list, tuple)):
        return Schedule(value)
    raise TypeError(f"Cannot make a plan from {type(value).__name__}; pass a Plan, a list of 0/1, a bit string, "
                    "'hurry:N:R' or the path of a plan or schedule JSON.")


def as_schedule(value, num_steps: int | None = None) -> Schedule:
    """`as_plan` for a value written as a schedule, as a `Schedule` (attnreuse 0.1's parser)."""
    plan = as_plan(value, num_steps)
    return plan if isinstance(plan, Schedule) else Schedule(plan)


def _hurry_numbers(value: str, num_steps: int | None) -> tuple[int, int]:
    parts = value.split(":")[1:]
    forms = "'hurry:NUM_STEPS:REUSE_STEPS'" + (" or 'hurry:REUSE_STEPS'" if num_steps is not None else "")
    if len(parts) == 1 and num_steps is not None:
        parts = [str(num_steps), *parts]
    try:
        n, r = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"Expected {forms}, got {value!r}.") from None
    return n, r

