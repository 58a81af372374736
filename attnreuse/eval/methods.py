"""Methods to compare, each a context manager that patches a pipeline and undoes it on exit.

`method(setup, spec, calibration)` yields a `Run`: called with a `GenerationSetup` (prompts, seeds) it returns the
images (N, H, W, 3) float in [0, 1]; its `info` says what a reuse method ran. Specs: `full`, `steps:K` (step
reduction), `hurry:R`, `phast:R` (searched on calibration prompts and cached, `search.cached_phast`), a schedule
JSON or bit string (attention reuse), and the peers (`pip install "attnreuse[peers]"`): `deepcache:I` (DeepCache,
interval I), `tgate:S` (T-GATE, gate step S), `tome:R` (ToMe for SD, ratio R), `pab:K` (diffusers' pyramid
attention broadcast every K steps inside its default timestep window), `taylorseer:I` (diffusers' TaylorSeer,
attention outputs computed every I steps and extrapolated between), `fbc:T` and `fastercache` (diffusers'
first-block cache and FasterCache, built for transformer denoisers), `magcache:T` (diffusers' MagCache, its
ratios calibrated on the calibration prompts). A peer that cannot run raises `PeerUnavailable` with the reason, so a
report can say why it is missing.

`REGISTRY` holds one `MethodSpec` per method name: its family (the report's group and the Pareto plot's curve), its
role (attnreuse's own, a peer, the reference or the step-reduction baseline), how it is built, the model kinds it
applies to, the packages it needs, its argument and the presets it joins. The CLI's list of methods, the presets
(`PRESETS`, per model kind), the report's families and the plot's styles are all read from it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..layers import denoiser
from ..pipelines.sampling import GenerationSetup, generators
from ..plan import Schedule, as_plan
from ..reuse import apply_reuse
from ..search import cached_phast, cached_plan

__all__ = ["method", "check_spec", "Run", "PeerUnavailable", "MethodSpec", "Argument", "REGISTRY", "SCHEDULES",
           "lookup", "records", "family", "family_role", "model_kind", "preset", "expand", "PRESETS", "PEERS",
           "KINDS", "ROLES"]


class PeerUnavailable(RuntimeError):
    """A method that cannot run here (package missing, model not supported): the report keeps the reason."""


@dataclass
class Run:
    """A method's generation: `run(setup)` gives the images of `setup`'s prompts and seeds."""

    generate: Callable[[GenerationSetup], np.ndarray]
    info: dict = field(default_factory=dict)

    def __call__(self, setup: GenerationSetup) -> np.ndarray:
        return self.generate(setup)


UNET, TRANSFORMER = "unet", "transformer"  # the model kinds: a pipeline's denoiser is a UNet or a transformer
KINDS = (UNET, TRANSFORMER)
ROLES = ("reference", "baseline", "attnreuse", "peer")  # full; step reduction; attnreuse's own methods; the peers


class Argument(NamedTuple):
    """A method's argument: its letter in the usage (`deepcache:I`), its type and bounds (N: the step count; whole
    numbers lie within their bounds, numbers strictly between them), and whether it may be left out."""

    letter: str
    cast: type
    low: float
    high: float | str | None = None
    optional: bool = False

    def check(self, spec: str, arg: str, num_steps: int) -> None:
        """A ValueError naming what is wrong with `arg`, the argument of `spec`."""
        name = spec.partition(":")[0]
        if not arg:
            if self.optional:
                return
            raise ValueError(f"method {spec!r}: {name} needs an argument ({name}:{self.letter}).")
        try:
            value = self.cast(arg)
        except ValueError:
            what = "a whole number" if self.cast is int else "a number"
            raise ValueError(f"method {spec!r}: {arg!r} is not {what}.") from None
        low, high = self.low, {"N-1": num_steps - 1, "N": num_steps}.get(self.high, self.high)
        if self.cast is int:
            ok = value >= low and (high is None or value <= high)
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        else:
            ok = value > low and (high is None or value < high)
            bounds = f"above {low}" + (f" and below {high}" if high is not None else "")
        if not ok:
            raise ValueError(f"method {spec!r}: {name}'s argument must be {bounds}, got {arg}.")


@dataclass(frozen=True)
class MethodSpec:
    """One method compared: the one record that the CLI's list of methods, the presets, the report's families and
    the plot's styles are read from.

    `name`: the prefix users type (`name` or `name:ARG`); `family`: the report's group and the Pareto plot's curve;
    `role`: one of ROLES, which says how the plot draws the family; `build(setup, arg, calibration)`: a context
    manager that patches `setup.pipe` and yields a `Run`; `applies_to`: the model kinds (KINDS) it runs on;
    `requires`: the (module, pip package) pairs it imports; `argument`: its `Argument`, None where it takes none;
    `calibrated`: it runs on the calibration prompts first; `presets`: {preset: the arguments it runs there ("" for
    none)}; `note`: said beside its usage in the CLI's help."""

    name: str
    family: str
    role: str
    build: Callable = field(repr=False, compare=False)
    applies_to: tuple[str, ...] = KINDS
    requires: tuple[tuple[str, str], ...] = ()
    argument: Argument | None = None
    calibrated: bool = False
    presets: dict = field(default_factory=dict, compare=False)
    note: str = ""

    def __post_init__(self):
        if self.role not in ROLES or not set(self.applies_to) <= set(KINDS):
            raise ValueError(f"method {self.name}: role {self.role!r}, kinds {self.applies_to!r}")

    @property
    def typed(self) -> str:
        """How it is typed: `full`, `deepcache:I`."""
        return f"{self.name}:{self.argument.letter}" if self.argument else self.name

    @property
    def usage(self) -> str:
        """Its entry in the CLI's help: how it is typed, and its note (`plan:B (a plan searched for ...)`)."""
        return f"{self.typed} ({self.note})" if self.note else self.typed

    def specs(self, preset: str) -> list[str]:
        """The specs it adds to `preset`."""
        return [f"{self.name}:{arg}" if arg else self.name for arg in self.presets.get(preset, ())]

    def check_runs_on(self, pipe) -> None:
        """`PeerUnavailable` where a package it imports is missing, or `pipe`'s denoiser is of a kind it does not
        apply to."""
        for module, package in self.requires:
            _import(module, package)
        if model_kind(pipe) not in self.applies_to:
            kinds = " and ".join("UNet" if kind == UNET else "transformer" for kind in self.applies_to)
            raise PeerUnavailable(f"{self.name} does not run on {type(denoiser(pipe)).__name__}: it applies to "
                                  f"{kinds} pipelines")


REGISTRY: dict[str, MethodSpec] = {}  # name -> its record, in the order the presets list them (filled below)


def _register(*specs: MethodSpec) -> None:
    for spec in specs:
        if spec.name in REGISTRY:
            raise ValueError(f"method {spec.name} is registered twice")
        REGISTRY[spec.name] = spec


def lookup(spec: str) -> MethodSpec:
    """The record of a method spec: by the name before its colon, else `SCHEDULES` (a schedule or plan file, or a
    bit string)."""
    return REGISTRY.get(spec.partition(":")[0], SCHEDULES)


def records() -> tuple[MethodSpec, ...]:
    """Every record: the registered ones, then `SCHEDULES`."""
    return (*REGISTRY.values(), SCHEDULES)


def family(spec: str) -> str:
    """The report's group and the Pareto plot's curve of a spec: `full`, `steps`, `reuse`, `plan` or the peer's
    name."""
    return lookup(spec).family


def family_role(name: str) -> str:
    """The role (ROLES) of a family; a family no record has (an older report's) is not attnreuse's: a peer."""
    return {spec.family: spec.role for spec in records()}.get(name, "peer")


def model_kind(pipe) -> str:
    """The kind (KINDS) of a pipeline: `unet` where it has a UNet, else `transformer`."""
    return UNET if getattr(pipe, "unet", None) is not None else TRANSFORMER


def preset(name: str, kind: str | None = None) -> list[str]:
    """The specs of a preset (PRESETS) for pipelines of `kind`; None: every kind's, for checking them all."""
    return [s for spec in REGISTRY.values() if kind is None or kind in spec.applies_to for s in spec.specs(name)]


def expand(methods: str, kind: str | None = None) -> list[str]:
    """A comma list of methods and presets as the specs it runs on a pipeline of `kind` (None: every kind's preset
    entries), each once, in order."""
    items = [item.strip() for item in methods.split(",") if item.strip()]
    return list(dict.fromkeys(s for item in items for s in (preset(item, kind) if item in PRESETS else [item])))


def _import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise PeerUnavailable(f"{package} is not installed (pip install 'attnreuse[peers]'): {err}") from None


def check_spec(spec: str, num_steps: int) -> None:
    """A ValueError naming what is wrong with a method spec, before anything runs."""
    record = lookup(spec)
    if record is SCHEDULES:
        try:
            schedule = as_plan(spec, num_steps)  # a bit string, or a schedule or plan file
        except (ValueError, TypeError) as err:
            raise ValueError(f"method {spec!r} is neither a method ({', '.join(REGISTRY)}) nor a schedule: "
                             f"{err}") from None
        if schedule.timesteps is None and len(schedule) != num_steps:
            raise ValueError(f"method {spec!r}: a schedule of {len(schedule)} entries for {num_steps} steps.")
        return
    name, colon, arg = spec.partition(":")
    if record.argument is None:
        if colon:
            raise ValueError(f"method {spec!r}: {name} takes no argument.")
        return
    record.argument.check(spec, arg, num_steps)


@contextmanager
def method(setup: GenerationSetup, spec: str, calibration: list[str] | None = None):
    """Patch `setup.pipe` for `spec` and yield its `Run`; the pipeline is restored on exit. `calibration`: the
    prompts `phast:R`, `plan:B` and `magcache:T` run on first (image i with seed i), which must not be the evaluated
    ones. A method whose package is missing, or that does not apply to the pipeline's kind, is `PeerUnavailable`."""
    record = lookup(spec)
    record.check_runs_on(setup.pipe)
    arg = spec if record is SCHEDULES else spec.partition(":")[2]
    with record.build(setup, arg, calibration) as run:
        yield run


@contextmanager
def _full(setup, arg, calibration):
    yield Run(lambda s: s.generate())


@contextmanager
def _steps(setup, arg, calibration):
    yield Run(lambda s: s.generate(num_inference_steps=int(arg)))


def _calibrated(setup, calibration, spec: str) -> GenerationSetup:
    if not calibration:
        raise ValueError(f"{spec} is searched on calibration prompts that are not the evaluated ones; none were "
                         "given (attnreuse eval: with --prompts FILE, the lines after the first --count are the "
                         "calibration prompts)")
    return GenerationSetup(setup.pipe, calibration, None, setup.num_steps, setup.guidance)


@contextmanager
def _reuse(setup, spec, calibration):
    """Reuse by a schedule or plan: `hurry:R`, `phast:R`, `plan:B`, a bit string, or a schedule or plan file."""
    name, _, arg = spec.partition(":")
    info = {}
    if name == "phast":
        spec = info["schedule_file"] = str(cached_phast(_calibrated(setup, calibration, spec), int(arg),
                                                        progress=True))
    elif name == "plan":
        spec = info["plan_file"] = str(cached_plan(_calibrated(setup, calibration, spec), float(arg), progress=True))
    value = as_plan(f"hurry:{setup.num_steps}:{arg}" if name == "hurry" else spec)
    if not isinstance(value, Schedule):  # a plan; a Schedule is one written as bits
        info.update(plan=str(value), predicted_latency=value.meta.get("predicted_latency"))
    else:
        info["schedule"] = str(value)
    with apply_reuse(setup.pipe, value):
        yield Run(lambda s: s.generate(), info)


def _reuse_by(name: str):
    """The build of `name:ARG` (hurry, phast, plan): `_reuse` of the whole spec."""
    return lambda setup, arg, calibration: _reuse(setup, f"{name}:{arg}", calibration)


@contextmanager
def _deepcache(setup, arg, calibration):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=setup.pipe)
    helper.set_params(cache_interval=int(arg or 3), cache_branch_id=0)
    helper.enable()
    try:
        yield Run(lambda s: s.generate())
    finally:
        helper.disable()


@contextmanager
def _tgate(setup, arg, calibration):
    from tgate import TgateSDLoader

    pipe = setup.pipe

    def generate(s):
        images = pipe.tgate(s.prompts, generator=generators(s.seeds, s.device), gate_step=int(arg or 10),
                            num_inference_steps=s.num_steps, guidance_scale=s.guidance, output_type="np").images
        return np.asarray(images, dtype=np.float32)

    with _instance_attributes_kept(denoiser(pipe)):
        TgateSDLoader(pipe)
        try:
            yield Run(generate)
        finally:
            del pipe.tgate


@contextmanager
def _tome(setup, arg, calibration):
    import tomesd

    tomesd.apply_patch(setup.pipe, ratio=float(arg or 0.5))
    try:
        yield Run(lambda s: s.generate())
    finally:
        tomesd.remove_patch(setup.pipe)


@contextmanager
def _instance_attributes_kept(unet):
    """On exit, `forward` and `cache` of every submodule as they were on entry. T-GATE replaces the attention
    modules' forward (and keeps a cache) on the instances; diffusers' hooks, once removed, leave the instance's
    `forward` set to the bound class method, which T-GATE must not take for a patch of its own to keep."""
    before = {module: {k: vars(module)[k] for k in ("forward", "cache") if k in vars(module)}
              for module in unet.modules()}
    try:
        yield
    finally:
        for module, kept in before.items():
            for key in ("forward", "cache"):
                vars(module).pop(key, None)
            vars(module).update(kept)


@contextmanager
def _timestep_of(model):
    """A callable that returns the timestep of `model`'s latest call: diffusers' PAB and FasterCache ask for it, and
    SD pipelines do not publish it (PixArt's passes it as a tensor)."""
    current = {"t": 1000}

    def record(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        current["t"] = int(t.reshape(-1)[0]) if hasattr(t, "reshape") else int(t)

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield lambda: current["t"]
    finally:
        hook.remove()


@contextmanager
def _pab(setup, arg, calibration):
    """diffusers' pyramid attention broadcast on the denoiser's self-attention, in its default timestep window."""
    from diffusers.hooks import HookRegistry, PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

    model = denoiser(setup.pipe)
    with _timestep_of(model) as timestep:
        config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=int(arg or 2),
                                                 current_timestep_callback=timestep)
        try:
            apply_pyramid_attention_broadcast(model, config)
        except Exception as err:  # noqa: BLE001 - the reason goes into the report
            raise PeerUnavailable(f"pyramid attention broadcast does not attach to {type(model).__name__}: "
                                  f"{err}") from None
        try:
            yield Run(lambda s: s.generate())
        finally:
            HookRegistry.check_if_exists_or_initialize(model).remove_hook(_PYRAMID_ATTENTION_BROADCAST_HOOK,
                                                                          recurse=True)


_DIFFUSERS_HOOKS = ("fbc_leader_block_hook", "fbc_block_hook", "faster_cache_denoiser", "faster_cache_block",
                    "taylorseer_cache", "mag_cache_leader_block_hook", "mag_cache_block_hook")


def _apply_diffusers_cache(unet, name: str, arg: str, timestep, steps: int, ratios=None) -> None:
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        TaylorSeerCacheConfig,
        apply_faster_cache,
        apply_first_block_cache,
        apply_mag_cache,
        apply_taylorseer_cache,
    )

    if name == "magcache":  # without ratios: its calibration run, which skips nothing and prints them
        apply_mag_cache(unet, MagCacheConfig(threshold=float(arg or 0.06), num_inference_steps=steps,
                                             mag_ratios=ratios, calibrate=ratios is None))
    elif name == "fbc":
        apply_first_block_cache(unet, FirstBlockCacheConfig(threshold=float(arg or 0.05)))
    elif name == "fastercache":
        apply_faster_cache(unet, FasterCacheConfig(current_timestep_callback=timestep, tensor_format="BCHW",
                                                   attention_weight_callback=lambda _: 0.5))
    else:  # TaylorSeer's default identifiers name a transformer's top-level blocks; a UNet nests them
        apply_taylorseer_cache(unet, TaylorSeerCacheConfig(
            cache_interval=int(arg or 5), cache_identifiers=[r".*transformer_blocks\.\d+\.attn\d*"]))


def _diffusers_cache(name: str):
    """diffusers' FirstBlockCache, FasterCache or TaylorSeer hooks on the denoiser, removed on exit even when they
    fail. Before each generation it does what diffusers' transformer pipelines do around their denoiser and the SD
    pipeline does not: reset the hooks' state and set the cache context (one, as the SD pipeline runs both CFG
    halves in one batch)."""
    @contextmanager
    def manager(setup, arg, calibration):
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        model = denoiser(setup.pipe)
        registry = HookRegistry.check_if_exists_or_initialize(model)

        def generate(s):
            registry.reset_stateful_hooks(recurse=True)
            _set_cache_context(model, CacheContext("denoiser"))
            return s.generate()

        @contextmanager
        def applied(timestep, ratios=None):
            try:
                _apply_diffusers_cache(model, name, arg, timestep, setup.num_steps, ratios)
                registry.invalidate_child_registries_cache()  # the context goes to the hooks found in that list
                if not any(set(_DIFFUSERS_HOOKS) & set(child.hooks)
                           for child in (registry, *registry._get_child_registries())):
                    raise LookupError("no module of the denoiser matched its identifiers")
                yield
            finally:
                for hook in _DIFFUSERS_HOOKS:
                    registry.remove_hook(hook, recurse=True)
                registry.invalidate_child_registries_cache()

        try:
            with _timestep_of(model) as timestep:
                ratios = None
                if name == "magcache":
                    with applied(timestep):
                        ratios = _printed_ratios(generate, _calibrated(setup, calibration, f"magcache:{arg}"))
                with applied(timestep, ratios):
                    yield Run(generate, {"mag_ratios": ratios} if ratios else {})
        except Exception as err:  # noqa: BLE001 - fbc and fastercache target transformer denoisers: say so
            raise PeerUnavailable(f"diffusers' {name} does not run on {type(model).__name__}: "
                                  f"{type(err).__name__}: {err}") from None
    return manager


def _printed_ratios(generate, setup: GenerationSetup) -> list[float]:
    """MagCache's magnitude ratios as its docs say to get them: a run with `calibrate=True` prints them after each
    generation; their mean over the calibration prompts' generations."""
    import ast
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        generate(setup)
    runs = [ast.literal_eval(line) for line in printed.getvalue().splitlines()
            if line.startswith("[") and not line.startswith("[MagCache]")]
    if not runs:
        raise LookupError("MagCache's calibration printed no ratios")
    return np.mean(runs, axis=0).round(4).tolist()


def _everywhere(*args: str) -> dict:
    return dict(quick=args, paper=args, frontier=args)


# the paper's ranges: r 4..12 of 20, K 10..18 steps; frontier: the planner's budgets against every peer
_register(
    MethodSpec("full", "full", "reference", _full, presets=_everywhere("")),
    MethodSpec("steps", "steps", "baseline", _steps, argument=Argument("K", int, 1),
               presets=dict(quick=("10", "13", "16"), paper=tuple(str(k) for k in range(10, 19, 2)),
                            frontier=("5", "7", "10", "14", "17"))),
    MethodSpec("hurry", "reuse", "attnreuse", _reuse_by("hurry"), argument=Argument("R", int, 0, "N-1"),
               presets=dict(quick=("6", "10"), paper=tuple(str(r) for r in range(4, 13, 2)), frontier=("10",))),
    MethodSpec("phast", "reuse", "attnreuse", _reuse_by("phast"), argument=Argument("R", int, 0, "N-1"),
               calibrated=True, presets=dict(frontier=("10",))),
    MethodSpec("plan", "plan", "attnreuse", _reuse_by("plan"), argument=Argument("B", float, 0.0, 1.0),
               calibrated=True, presets=dict(frontier=("0.35", "0.5", "0.7", "0.85")),
               note="a plan searched for latency budget B"),
    MethodSpec("deepcache", "deepcache", "peer", _deepcache, (UNET,), (("DeepCache", "DeepCache"),),
               Argument("I", int, 1, optional=True), presets=dict(quick=("3",), paper=("2", "3", "5"),
                                                                  frontier=("2", "3", "5"))),
    MethodSpec("tgate", "tgate", "peer", _tgate, (UNET,), (("tgate", "tgate"),),
               Argument("S", int, 1, "N", optional=True), presets=_everywhere("10")),
    MethodSpec("tome", "tome", "peer", _tome, (UNET,), (("tomesd", "tomesd"),),
               Argument("R", float, 0.0, 1.0, optional=True), presets=_everywhere("0.5")),
    MethodSpec("pab", "pab", "peer", _pab, argument=Argument("K", int, 1, optional=True), presets=_everywhere("2")),
    MethodSpec("taylorseer", "taylorseer", "peer", _diffusers_cache("taylorseer"),
               argument=Argument("I", int, 1, optional=True), presets=_everywhere("5")),
    MethodSpec("fbc", "fbc", "peer", _diffusers_cache("fbc"), (TRANSFORMER,),
               argument=Argument("T", float, 0.0, optional=True), presets=dict(frontier=("0.05",))),
    MethodSpec("fastercache", "fastercache", "peer", _diffusers_cache("fastercache"), (TRANSFORMER,),
               presets=dict(frontier=("",))),
    MethodSpec("magcache", "magcache", "peer", _diffusers_cache("magcache"), (TRANSFORMER,),
               argument=Argument("T", float, 0.0, optional=True), calibrated=True, presets=dict(frontier=("0.06",))),
)
# what no name matches: a schedule or plan file, or a bit string (1 = compute), run by attention reuse
SCHEDULES = MethodSpec("FILE.json", "reuse", "attnreuse", _reuse, note="a schedule or plan file; or a bit string")
PEERS = tuple(name for name, spec in REGISTRY.items() if spec.role == "peer")
# --methods shorthands: {preset: {model kind: its specs}}
PRESETS = {name: {kind: tuple(preset(name, kind)) for kind in KINDS}
           for name in dict.fromkeys(p for spec in REGISTRY.values() for p in spec.presets)}
