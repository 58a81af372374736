"""Methods to compare, each a context manager that patches a pipeline and undoes it on exit.

`method(setup, spec, calibration)` yields a `Run`: called with a `GenerationSetup` (prompts, seeds) it returns the
images (N, H, W, 3) float in [0, 1]; its `info` says what a reuse method ran. Specs: `full`, `steps:K` (step
reduction), `hurry:R`, `phast:R` (searched on calibration prompts and cached, `search.cached_phast`), a schedule
JSON or bit string (attention reuse), and the peers (`pip install "attnreuse[peers]"`): `deepcache:I` (DeepCache,
interval I), `tgate:S` (T-GATE, gate step S), `tome:R` (ToMe for SD, ratio R), `pab:K` (diffusers' pyramid
attention broadcast every K steps inside its default timestep window), `taylorseer:I` (diffusers' TaylorSeer,
attention outputs computed every I steps and extrapolated between), `fbc:T` and `fastercache` (diffusers'
first-block cache and FasterCache, built for transformer denoisers). A peer that cannot run raises
`PeerUnavailable` with the reason, so a report can say why it is missing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..pipelines.sampling import GenerationSetup, generators
from ..plan import Plan, plan_or_schedule
from ..planner.store import cached_plan
from ..reuse import apply_reuse, denoiser
from ..search import cached_phast

__all__ = ["method", "check_spec", "Run", "PeerUnavailable", "family", "METHODS", "PEERS"]


class PeerUnavailable(RuntimeError):
    """A method that cannot run here (package missing, model not supported): the report keeps the reason."""


@dataclass
class Run:
    """A method's generation: `run(setup)` gives the images of `setup`'s prompts and seeds."""

    generate: Callable[[GenerationSetup], np.ndarray]
    info: dict = field(default_factory=dict)

    def __call__(self, setup: GenerationSetup) -> np.ndarray:
        return self.generate(setup)


METHODS: dict[str, Callable] = {}  # spec name -> context manager (setup, argument, calibration) yielding a Run
PEERS = ("deepcache", "tgate", "tome", "pab", "taylorseer", "fbc", "fastercache")


def _register(*names):
    def wrap(fn):
        manager = contextmanager(fn)
        for name in names:
            METHODS[name] = manager
        return manager
    return wrap


def family(spec: str) -> str:
    """The curve a spec belongs to in the Pareto plot: `full`, `steps`, `reuse` or the peer's name."""
    name = spec.split(":")[0]
    return name if name in ("full", "steps", "plan", *PEERS) else "reuse"


def _import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise PeerUnavailable(f"{package} is not installed (pip install 'attnreuse[peers]'): {err}") from None


# each method's argument: (type, bounds, whether it may be left out); N is the step count. Whole numbers lie within
# their bounds, numbers strictly between them
_ARGUMENTS = {"full": None, "fastercache": None, "steps": (int, 1, None, False), "hurry": (int, 0, "N-1", False),
              "phast": (int, 0, "N-1", False), "plan": (float, 0.0, 1.0, False), "deepcache": (int, 1, None, True),
              "tgate": (int, 1, "N", True), "tome": (float, 0.0, 1.0, True), "pab": (int, 1, None, True),
              "taylorseer": (int, 1, None, True), "fbc": (float, 0.0, None, True), "magcache": (float, 0.0, None, True)}


def check_spec(spec: str, num_steps: int) -> None:
    """A ValueError naming what is wrong with a method spec, before anything runs."""
    name, colon, arg = spec.partition(":")
    if name not in _ARGUMENTS:
        try:
            schedule = plan_or_schedule(spec, num_steps)  # a bit string, or a schedule or plan file
        except (ValueError, TypeError) as err:
            raise ValueError(f"method {spec!r} is neither a method ({', '.join(_ARGUMENTS)}) nor a schedule: "
                             f"{err}") from None
        if schedule.timesteps is None and len(schedule) != num_steps:
            raise ValueError(f"method {spec!r}: a schedule of {len(schedule)} entries for {num_steps} steps.")
        return
    kind = _ARGUMENTS[name]
    if kind is None:
        if colon:
            raise ValueError(f"method {spec!r}: {name} takes no argument.")
        return
    cast, low, high, optional = kind
    if not arg:
        if optional:
            return
        raise ValueError(f"method {spec!r}: {name} needs an argument ({name}:{cast.__name__.upper()}).")
    try:
        value = cast(arg)
    except ValueError:
        what = "a whole number" if cast is int else "a number"
        raise ValueError(f"method {spec!r}: {arg!r} is not {what}.") from None
    high = {"N-1": num_steps - 1, "N": num_steps}.get(high, high)
    if cast is int:
        ok = value >= low and (high is None or value <= high)
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
    else:
        ok = value > low and (high is None or value < high)
        bounds = f"above {low}" + (f" and below {high}" if high is not None else "")
    if not ok:
        raise ValueError(f"method {spec!r}: {name}'s argument must be {bounds}, got {arg}.")


@contextmanager
def method(setup: GenerationSetup, spec: str, calibration: list[str] | None = None):
    """Patch `setup.pipe` for `spec` and yield its `Run`; the pipeline is restored on exit. `calibration`: the
    prompts `phast:R` searches on (image i with seed i), which must not be the evaluated ones."""
    name, _, arg = spec.partition(":")
    manager = METHODS[name](setup, arg, calibration) if name in METHODS else _reuse(setup, spec, calibration)
    with manager as run:
        yield run


@_register("full")
def _full(setup, arg, calibration):
    yield Run(lambda s: s.generate())


@_register("steps")
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
    value = plan_or_schedule(f"hurry:{setup.num_steps}:{arg}" if name == "hurry" else spec)
    if isinstance(value, Plan):
        info.update(plan=str(value), predicted_latency=value.meta.get("predicted_latency"))
    else:
        info["schedule"] = str(value)
    with apply_reuse(setup.pipe, value):
        yield Run(lambda s: s.generate(), info)


METHODS.update({name: (lambda setup, arg, calibration, name=name: _reuse(setup, f"{name}:{arg}", calibration))
                for name in ("hurry", "phast", "plan")})


@_register("deepcache")
def _deepcache(setup, arg, calibration):
    helper = _import("DeepCache", "DeepCache").DeepCacheSDHelper(pipe=setup.pipe)
    helper.set_params(cache_interval=int(arg or 3), cache_branch_id=0)
    helper.enable()
    try:
        yield Run(lambda s: s.generate())
    finally:
        helper.disable()


@_register("tgate")
def _tgate(setup, arg, calibration):
    loader, pipe = _import("tgate", "tgate").TgateSDLoader, setup.pipe

    def generate(s):
        images = pipe.tgate(s.prompts, generator=generators(s.seeds, s.device), gate_step=int(arg or 10),
                            num_inference_steps=s.num_steps, guidance_scale=s.guidance, output_type="np").images
        return np.asarray(images, dtype=np.float32)

    with _instance_attributes_kept(denoiser(pipe)):
        loader(pipe)
        try:
            yield Run(generate)
        finally:
            del pipe.tgate


@_register("tome")
def _tome(setup, arg, calibration):
    tomesd = _import("tomesd", "tomesd")
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


@_register("pab")
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


METHODS.update({name: _diffusers_cache(name) for name in ("fbc", "fastercache", "taylorseer", "magcache")})
