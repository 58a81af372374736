"""Methods to compare, each a context manager that patches a Stable Diffusion pipeline and undoes it on exit.

`method(pipe, spec, num_steps, guidance_scale)` yields a function `run(prompts, generators) -> images`
(N, H, W, 3) float in [0, 1]. Specs: `full`, `steps:K` (step reduction), `hurry:R`, `phast:R` (the PHAST schedule
with R reuse steps, searched on calibration prompts and cached, see `attnreuse.search.cached_phast`), a schedule
JSON or bit string (attention reuse), and the peers, installed with `pip install "attnreuse[peers]"`:
`deepcache:I` (DeepCache, cache interval I), `tgate:S` (T-GATE, gate step S), `tome:R` (ToMe for SD, merge ratio
R), `pab:K` (diffusers' pyramid attention broadcast, attention recomputed every K steps inside its default timestep
window), `taylorseer:I` (diffusers' TaylorSeer, attention outputs computed every I steps and extrapolated between),
`fbc:T` and `fastercache` (diffusers' first-block cache with threshold T, and FasterCache; both are built for
transformer denoisers). A reuse method's `run` carries `run.info` (the schedule's bits, and for `phast:R` its
file) for the report. A peer that cannot run raises `PeerUnavailable` with the reason, so a report can say why
it is missing.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

__all__ = ["method", "PeerUnavailable", "family"]


class PeerUnavailable(RuntimeError):
    """A method that cannot run here (package missing, model not supported): the report keeps the reason."""


def family(spec: str) -> str:
    """The curve a spec belongs to in the Pareto plot: `full`, `steps`, `reuse` or the peer's name."""
    name = spec.split(":")[0]
    peers = ("deepcache", "tgate", "tome", "pab", "taylorseer", "fbc", "fastercache")
    return name if name in ("full", "steps", *peers) else "reuse"


def _images(output) -> np.ndarray:
    return np.asarray(output.images, dtype=np.float32)


def _import(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise PeerUnavailable(f"{package} is not installed (pip install 'attnreuse[peers]'): {err}") from None


@contextmanager
def method(pipe, spec: str, num_steps: int, guidance_scale: float, calibration: list[str] | None = None):
    """Patch `pipe` for `spec` and yield `run(prompts, generators)`; the pipeline is restored on exit.
    `calibration`: the prompts `phast:R` searches on (image i with seed i), which must not be the evaluated ones."""
    from . import apply_attention_reuse
    from .schedule import as_schedule
    from .search import cached_phast

    name, _, arg = spec.partition(":")
    kwargs = dict(num_inference_steps=num_steps, guidance_scale=guidance_scale, output_type="np")

    def run(prompts, generators, **extra):
        return _images(pipe(prompts, generator=generators, **{**kwargs, **extra}))

    if name == "full":
        yield run
    elif name == "steps":
        yield lambda prompts, generators: run(prompts, generators, num_inference_steps=int(arg))
    elif name == "deepcache":
        helper = _import("DeepCache", "DeepCache").DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=int(arg or 3), cache_branch_id=0)
        helper.enable()
        try:
            yield run
        finally:
            helper.disable()
    elif name == "tgate":
        loader = _import("tgate", "tgate").TgateSDLoader
        with _instance_attributes_kept(pipe.unet):
            loader(pipe)
            try:
                yield lambda prompts, generators: _images(pipe.tgate(prompts, generator=generators,
                                                                     gate_step=int(arg or 10), **kwargs))
            finally:
                del pipe.tgate
    elif name == "tome":
        tomesd = _import("tomesd", "tomesd")
        tomesd.apply_patch(pipe, ratio=float(arg or 0.5))
        try:
            yield run
        finally:
            tomesd.remove_patch(pipe)
    elif name == "pab":
        with _pab(pipe, int(arg or 2)):
            yield run
    elif name in ("fbc", "fastercache", "taylorseer"):
        with _diffusers_cache(pipe, name, arg) as fresh:
            def fresh_run(prompts, generators):
                fresh()
                return run(prompts, generators)
            yield fresh_run
    else:
        info = {}
        if name == "phast":
            if not calibration:
                raise ValueError("phast:R searches its schedule on calibration prompts that are not the evaluated "
                                 "ones; none were given (attnreuse eval: with --prompts FILE, the lines after the "
                                 "first --count are the calibration prompts)")
            spec = info["schedule_file"] = str(cached_phast(pipe, calibration, list(range(len(calibration))),
                                                            num_steps, int(arg), guidance_scale, progress=True))
        schedule = as_schedule(spec if name != "hurry" else f"hurry:{num_steps}:{arg}")
        run.info = dict(info, schedule="".join(map(str, schedule.bits)))
        with apply_attention_reuse(pipe, schedule):
            yield run


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
def _pab(pipe, skip: int):
    """diffusers' pyramid attention broadcast on the UNet's self-attention; SD pipelines do not publish the
    current timestep, so a hook on the UNet records it for PAB's callback."""
    from diffusers.hooks import HookRegistry, PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

    current = {"t": 1000}

    def record(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        current["t"] = int(t.reshape(-1)[0]) if hasattr(t, "reshape") else int(t)

    hook = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=skip,
                                             current_timestep_callback=lambda: current["t"])
    try:
        apply_pyramid_attention_broadcast(pipe.unet, config)
    except Exception as err:  # noqa: BLE001 - the reason goes into the report
        hook.remove()
        raise PeerUnavailable(f"pyramid attention broadcast does not attach to {type(pipe.unet).__name__}: {err}")
    try:
        yield
    finally:
        hook.remove()
        HookRegistry.check_if_exists_or_initialize(pipe.unet).remove_hook(_PYRAMID_ATTENTION_BROADCAST_HOOK,
                                                                          recurse=True)


@contextmanager
def _diffusers_cache(pipe, name: str, arg: str):
    """diffusers' FirstBlockCache, FasterCache or TaylorSeer hooks on the UNet, removed on exit even when they fail.

    Yields `fresh()`, to call before each generation: it does what diffusers' transformer pipelines do around their
    denoiser and the SD pipeline does not, resetting the hooks' state and setting the cache context (one, as the SD
    pipeline runs the conditional and unconditional halves in one batch). TaylorSeer's default identifiers name a
    transformer's top-level blocks (`transformer_blocks.*attn`); a UNet nests the same attention modules inside its
    down, mid and up blocks, so they are named by the same pattern below any prefix.
    """
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, HookRegistry, TaylorSeerCacheConfig,
                                 apply_faster_cache, apply_first_block_cache, apply_taylorseer_cache)
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    hooks = ("fbc_leader_block_hook", "fbc_block_hook", "faster_cache_denoiser", "faster_cache_block",
             "taylorseer_cache")
    registry = HookRegistry.check_if_exists_or_initialize(pipe.unet)

    def fresh():
        registry.reset_stateful_hooks(recurse=True)
        _set_cache_context(pipe.unet, CacheContext("denoiser"))

    try:
        try:
            if name == "fbc":
                apply_first_block_cache(pipe.unet, FirstBlockCacheConfig(threshold=float(arg or 0.05)))
            elif name == "fastercache":
                apply_faster_cache(pipe.unet, FasterCacheConfig(current_timestep_callback=lambda: 500,
                                                                 attention_weight_callback=lambda _: 0.5))
            else:
                apply_taylorseer_cache(pipe.unet, TaylorSeerCacheConfig(
                    cache_interval=int(arg or 5), cache_identifiers=[r".*transformer_blocks\.\d+\.attn\d*"]))
            registry.invalidate_child_registries_cache()  # the context goes to the hooks found in that list
            if not any(set(hooks) & set(child.hooks) for child in (registry, *registry._get_child_registries())):
                raise LookupError("no module of the denoiser matched its identifiers")
            yield fresh
        finally:
            for hook in hooks:
                registry.remove_hook(hook, recurse=True)
            registry.invalidate_child_registries_cache()
    except Exception as err:  # noqa: BLE001 - fbc and fastercache target transformer denoisers: say so in the report
        raise PeerUnavailable(f"diffusers' {name} does not run on {type(pipe.unet).__name__}: "
                              f"{type(err).__name__}: {err}") from None
