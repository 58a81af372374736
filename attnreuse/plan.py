"""Reuse plans: per denoiser call, what each unit of the denoiser computes and what it reuses.

A plan generalises the paper's schedule (Hunter, Dudziak et al. 2024) from "which calls reuse attention maps" to
every granularity at which a denoiser's work can be reused across calls. Each unit has one bit per call (1 =
compute, 0 = reuse, the schedule's convention):

attention  attention layers (name patterns) reuse their map, Q and K, or output (`mode`), as a schedule does.
blocks     transformer blocks (`Transformer2DModel` in a UNet) reuse their residual: output minus input of their
           last compute call, added to the fresh input.
branch     the UNet's body below a depth, as DeepCache does: at a reuse call only the last `depths[c]` up layers
           (and the down layers feeding them) run; the rest return what they computed at the last compute call.
call       the whole denoiser call: its output (`mode="output"`) or its residual (`"residual"`) is reused.

Units nest: when the call unit reuses, nothing inside runs; when the branch reuses, units inside its skipped part
do not run at that call. The first call computes everything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from .files import atomic_write, parse_json_input, read_json
from .schedule import Schedule, as_schedule, length_error, whole_number

__all__ = ["Unit", "Plan", "as_plan", "plan_or_schedule", "KINDS", "PLAN_FORMAT", "PLAN_VERSION"]

PLAN_FORMAT, PLAN_VERSION = "attnreuse-plan", 1
KINDS = ("attention", "blocks", "branch", "call")
_MODES = {"attention": ("map", "qk", "output", "auto"), "call": ("output", "residual"), "blocks": ("residual",),
          "branch": ("output",)}
_UNIT_KEYS = {"kind", "bits", "mode", "layers", "depths"}
_PLAN_KEYS = {"format", "version", "units", "timesteps", "meta"}


@dataclass(frozen=True)
class Unit:
    """One unit of a plan: its kind, one bit per call (1 compute, 0 reuse) and what its reuse keeps."""

    kind: str
    bits: tuple[int, ...]
    mode: str | None = None  # attention: map, qk, output, auto; call: output, residual
    layers: tuple[str, ...] | None = None  # attention, blocks: layer names or glob patterns (None: every layer)
    depths: tuple[int, ...] | None = None  # branch: up layers that run at each reuse call (ignored at computes)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unit kind must be one of {KINDS}, got {self.kind!r}.")
        object.__setattr__(self, "bits", Schedule(self.bits).bits)  # 0/1, the first call computes
        mode = self.mode if self.mode is not None else _MODES[self.kind][0]
        if mode not in _MODES[self.kind]:
            raise ValueError(f"a {self.kind} unit's mode must be one of {_MODES[self.kind]}, got {self.mode!r}.")
        object.__setattr__(self, "mode", mode)
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(p, str) and p for p in self.layers):
                raise TypeError(f"a unit's layers are a list of names or patterns, got {self.layers!r}.")
            object.__setattr__(self, "layers", tuple(self.layers))
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


@dataclass(frozen=True)
class Plan:
    """Per denoiser call, what each unit computes or reuses; `timesteps` (0-1000) let it move to other samplers.

    >>> Plan.deepcache(6, interval=3, depth=1).units["branch"].bits
    (1, 0, 0, 1, 0, 0)
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
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", Schedule([1] * len(self), self.timesteps).timesteps)
        if not isinstance(self.meta, dict):
            raise TypeError(f"a plan's meta is a dict, got {type(self.meta).__name__}.")

    def __len__(self) -> int:
        return len(next(iter(self.units.values())).bits)

    def __str__(self) -> str:
        return "; ".join(f"{name} {''.join(map(str, u.bits))}" for name, u in self.units.items())

    @classmethod
    def from_schedule(cls, schedule, mode: str = "map", layers=None) -> Plan:
        """The paper's schedule as a plan: one attention unit."""
        schedule = Schedule(schedule)
        return cls({"attention": Unit("attention", schedule.bits, mode, layers)}, schedule.timesteps,
                   dict(schedule.meta))

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
        return cls({"call": Unit("call", [1] * whole_number(num_steps, "num_steps", 1))})

    @classmethod
    def from_json(cls, data) -> Plan:
        """A plan from a JSON string, dict or file; errors name the file and the field."""
        return parse_json_input(data, "plan", cls._from_data)

    @classmethod
    def _from_data(cls, data) -> Plan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a plan (a JSON object with \"format\": \"{PLAN_FORMAT}\").")
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
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))
        return text

    def at_timesteps(self, timesteps) -> Plan:
        return replace(self, timesteps=tuple(float(t) for t in timesteps))

    def for_timesteps(self, timesteps) -> Plan:
        """This plan on other timesteps: each new call takes the actions of the nearest recorded timestep."""
        if self.timesteps is None:
            raise ValueError("this plan has no timesteps, so it cannot be moved to other timesteps; record them "
                             "with plan.at_timesteps(scheduler.timesteps).")
        timesteps = [float(t) for t in timesteps]
        nearest = [min(range(len(self)), key=lambda i: abs(self.timesteps[i] - t)) for t in timesteps]
        units = {name: u.select(nearest) for name, u in self.units.items()}
        return Plan(units, timesteps, dict(self.meta, moved_from=len(self)))

    def expand(self, num_calls: int, order: int = 1) -> Plan:
        """This plan of N sampler steps on a sampler that calls the model `order` times a step (2N - 1 calls for
        Heun and DPM2); every call of step i follows entry i."""
        n = len(self)
        if num_calls == n:
            return self
        if order > 1 and num_calls == order * (n - 1) + 1:
            calls = [min(c // order, n - 1) for c in range(num_calls)]
            return Plan({name: u.select(calls) for name, u in self.units.items()}, None, self.meta)
        raise ValueError(length_error(n, num_calls, order, "schedule" if set(self.units) == {"attention"} else "plan"))


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


def plan_or_schedule(value, num_steps: int | None = None) -> Plan | Schedule:
    """A `Plan` or `Schedule` as given, the contents of a plan or schedule JSON file, or a schedule in any form
    `as_schedule` takes."""
    if isinstance(value, (Plan, Schedule)):
        return value
    if isinstance(value, (str, Path)) and str(value).endswith(".json"):
        data = read_json(value, "plan or schedule file")
        if isinstance(data, dict) and data.get("format") == PLAN_FORMAT:
            return Plan.from_json(Path(value))
    return as_schedule(value, num_steps)


def as_plan(value, mode: str = "map", layers=None, num_steps: int | None = None) -> Plan:
    """`plan_or_schedule(value)` as a plan: a schedule becomes one attention unit with `mode` and `layers`."""
    value = plan_or_schedule(value, num_steps)
    return value if isinstance(value, Plan) else Plan.from_schedule(value, mode, layers)
