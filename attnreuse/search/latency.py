"""What a plan costs, predicted from a profile of the target device, and measured.

The profile times one denoiser call of each kind a plan can make: at each reuse level (`levels.Levels`: compute,
a UNet's branch at each depth or a transformer's last blocks, the whole call reused) with its attention layers
computing, storing or reusing, each as a ratio to plain calls timed beside it; and the generation's fixed cost
outside the denoiser (text encoder, scheduler, VAE).
A plan's latency is then the fixed cost plus the cost of each of its calls, as a ratio to the full sampler's.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..files import read_json, write_json
from ..layers import denoiser
from ..pipelines.sampling import GenerationSetup
from ..pipelines.timing import device_name, timed
from ..plan import Plan, Unit
from ..plan_cache import cache_root
from ..reuse import apply_reuse
from .levels import Levels

__all__ = ["LatencyModel", "profile", "cached_profile", "measure_latency", "kind_plan", "first_call",
           "ATTENTION_ACTIONS"]

ATTENTION_ACTIONS = ("compute", "store", "reuse")


@dataclass
class LatencyModel:
    """Costs of each kind of call as a ratio to a plain call (`costs[level][attention action]`), the fixed cost of a
    generation in plain calls, and where they were measured."""

    levels: int  # reuse levels 0 (compute) .. levels - 1 (the whole call); `levels.Levels` between
    costs: dict = field(default_factory=dict)  # {level: {attention action: ratio}}
    fixed: float = 0.0  # a generation's cost outside the denoiser, in plain calls
    plain_ms: float = 0.0
    device: str = ""
    batch: int = 0
    mode: str = "output"  # the attention mode the profile timed

    def call_cost(self, level: int, attention: str) -> float:
        row = self.costs[level]
        return row.get(attention, row["compute"])

    def predict(self, levels, attention) -> float:
        """The latency of a generation with these per-call levels and attention actions, as a ratio to the full
        sampler's (every call plain)."""
        total = sum(self.call_cost(lv, a) for lv, a in zip(levels, attention))
        return (self.fixed + total) / (self.fixed + len(levels))

    def to_dict(self) -> dict:
        return {"levels": self.levels, "costs": {str(k): v for k, v in self.costs.items()}, "fixed": self.fixed,
                "plain_ms": self.plain_ms, "device": self.device, "batch": self.batch, "mode": self.mode}

    @classmethod
    def from_dict(cls, data: dict) -> LatencyModel:
        return cls(data["levels"], {int(k): v for k, v in data["costs"].items()}, data["fixed"], data["plain_ms"],
                   data["device"], data["batch"], data.get("mode", "output"))


def kind_plan(level: int, structure: Levels, attention: str, mode: str) -> Plan:
    """A plan whose call 1 is the kind to time: reuse level `level` of `structure` with its attention layers doing
    `attention`. Call 0 computes and keeps what call 1 reuses; a store at call 1 needs a call 2 that reuses it."""
    attention_bits = {"compute": [1, 1], "reuse": [1, 0], "store": [1, 1, 0]}[attention]
    levels = [0, level] + [0] * (len(attention_bits) - 2)
    units = {"attention": Unit("attention", attention_bits, mode)}
    units.update({name: unit for name, unit in structure.units(levels).items() if not all(unit.bits)})
    return Plan(units)


def _paired_ratio(model, call, plan: Plan, repeats: int, device) -> tuple[float, float]:
    """Call 1 of `plan` against call 1 of an all-compute generation run just before it, `repeats` times: the median
    of the paired ratios (drift on a shared machine cancels in each pair) and of the plain call's milliseconds."""
    def call_one(handle):
        with handle.generation():
            times = [timed(lambda c=c: call(c), device)[1] for c in range(len(plan))]
        return times[1]

    ratios, plain = [], []
    with torch.no_grad(), apply_reuse(model, Plan.all_compute(len(plan))) as base:
        call_one(base)
        base_times = [call_one(base) for _ in range(repeats)]
    with torch.no_grad(), apply_reuse(model, plan) as handle:
        call_one(handle)
        for base_s in base_times:
            ratios.append(call_one(handle) / base_s)
            plain.append(base_s * 1000)
    return statistics.median(ratios), statistics.median(plain)


class _Captured(Exception):
    pass


def first_call(setup: GenerationSetup):
    """The denoiser, a function that repeats the first call of a generation of the setup (both CFG branches, every
    input as the pipeline passed it) at its timestep scaled by 1 - c/10 for call c, and that call's sample."""
    model, seen = denoiser(setup.pipe), {}

    def capture(module, args, kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise _Captured

    hook = model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        setup.generate()
    except _Captured:
        pass
    finally:
        hook.remove()
    args, kwargs = seen["args"], dict(seen["kwargs"])
    if "timestep" not in kwargs:  # the UNets' second positional argument
        args, kwargs["timestep"] = args[:1], args[1]
    timestep = kwargs["timestep"]

    def call(c: int):
        return model(*args, **dict(kwargs, timestep=timestep * (1 - c / 10)))

    return model, call, args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))


def profile(setup: GenerationSetup, structure: Levels, mode: str = "output", repeats: int = 7,
            progress: bool = False, kinds=None, fixed: bool = True) -> LatencyModel:
    """Time every kind of call of `structure`'s levels (or only `kinds`, pairs of level and attention action) on
    the setup's device and batch, each paired with plain calls run just before it, and the fixed cost of a
    generation outside the denoiser (unless `fixed` is False: the caller measures it)."""
    levels = structure.top + 1
    with torch.no_grad():
        model, call, sample = first_call(setup)
    kinds = kinds or [(lv, a) for lv in range(levels) for a in ATTENTION_ACTIONS if lv < levels - 1 or a == "compute"]
    latency = LatencyModel(levels, {lv: {} for lv in range(levels)}, device=device_name(setup.device),
                           batch=sample.shape[0], mode=mode)
    plain = []
    for level, attention in tqdm(sorted(set(kinds)), desc="profiling calls", disable=not progress,
                                 dynamic_ncols=True):
        if (level, attention) == (0, "compute"):
            latency.costs[0]["compute"] = 1.0  # the plain call itself
            continue
        ratio, plain_ms = _paired_ratio(model, call, kind_plan(level, structure, attention, mode), repeats,
                                        setup.device)
        latency.costs[level][attention] = ratio
        plain.append(plain_ms)
    latency.costs[0].setdefault("compute", 1.0)
    latency.plain_ms = statistics.median(plain) if plain else 0.0
    latency.fixed = _fixed_cost(setup) if fixed else 0.0
    return latency


def _fixed_cost(setup: GenerationSetup, repeats: int = 3) -> float:
    """A generation's time outside the denoiser, in its own denoiser calls: from the same generations, their whole
    time and the time of their calls (hooks around each)."""
    clock, spent = [], []
    model = denoiser(setup.pipe)
    hooks = [model.register_forward_pre_hook(lambda *a: clock.append(time.perf_counter())),
             model.register_forward_hook(lambda *a: spent.append(time.perf_counter() - clock[-1]))]
    fixed = []
    try:
        setup.generate()  # warm-up
        for _ in range(repeats):
            spent.clear()
            seconds = timed(setup.generate, setup.device)[1]
            fixed.append((seconds - sum(spent)) / statistics.median(spent))
    finally:
        for hook in hooks:
            hook.remove()
    return max(0.0, statistics.median(fixed))


def measure_latency(setup: GenerationSetup, plan: Plan, rounds: int = 5) -> dict:
    """The plan's measured latency as a ratio to the full sampler: a warm-up of each, then `rounds` alternating
    timed generations of the setup; medians, and the device."""
    times = {"full": [], "plan": []}
    for round_ in range(rounds + 1):
        seconds = timed(setup.generate, setup.device)[1]
        with apply_reuse(setup.pipe, plan):
            planned = timed(setup.generate, setup.device)[1]
        if round_:
            times["full"].append(seconds)
            times["plan"].append(planned)
    full, planned = statistics.median(times["full"]), statistics.median(times["plan"])
    return {"ratio": planned / full, "full_s": full, "plan_s": planned, "rounds": rounds,
            "device": device_name(setup.device), "batch": len(setup.prompts), "times_s": times}


def cached_profile(setup: GenerationSetup, structure: Levels, kinds, repeats: int) -> tuple[LatencyModel, bool]:
    """`profile(setup, structure, kinds=kinds, fixed=False)`, kept per model, device, dtype, batch and resolution
    (what a call's relative cost depends on), so a second budget or sampler does not time it again; and whether it
    was read from the cache. An entry that cannot be read is timed anew and written over."""
    model = denoiser(setup.pipe)
    parameter = next(model.parameters())
    key = {"model": type(model).__name__, "config": {k: str(v) for k, v in model.config.items()},
           "device": device_name(setup.device), "dtype": str(parameter.dtype), "batch": len(setup.prompts),
           "kinds": sorted(map(list, kinds)), "mode": "output"}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / "profiles" / f"{type(model).__name__}-{digest}.json"
    if path.exists():
        try:
            saved = read_json(path, "profile")
            if saved.get("key") == key:
                return LatencyModel.from_dict(saved["latency"]), True
        except (ValueError, KeyError, TypeError):
            pass  # damaged: timed anew below
    latency = profile(setup, structure, kinds=kinds, repeats=repeats, fixed=False)
    write_json(path, {"key": key, "latency": latency.to_dict()})
    return latency, False
