"""Methods to compare, each a context manager that patches a Stable Diffusion pipeline and undoes it on exit.

`method(pipe, spec, num_steps)` yields a function `run(prompts, generators) -> images` (N, H, W, 3) float in
[0, 1]. Specs: `full`, `steps:K` (step reduction), `hurry:R`, a schedule JSON or bit string (attention reuse),
and the peers, installed with `pip install "attnreuse[peers]"`: `deepcache:I` (DeepCache, cache interval I),
`tgate:S` (T-GATE, gate step S), `tome:R` (ToMe for SD, merge ratio R), `pab:K` (diffusers' pyramid attention
broadcast, attention recomputed every K steps inside its default timestep window), `fbc:T` and `fastercache`
(diffusers' first-block cache with threshold T, and FasterCache; both are built for transformer denoisers). A peer that cannot run
raises `PeerUnavailable` with the reason, so a report can say why it is missing.
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
    return name if name in ("full", "steps", "deepcache", "tgate", "tome", "pab", "fbc", "fastercache") else "reuse"


def _images(output) -> np.ndarray:
    return np.asarray(output.images, dtype=np.float32)


def _import(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise PeerUnavailable(f"{package} is not installed (pip install 'attnreuse[peers]'): {err}") from None


@contextmanager
def method(pipe, spec: str, num_steps: int, guidance_scale: float):
    """Patch `pipe` for `spec` and yield `run(prompts, generators)`; the pipeline is restored on exit."""
    from . import apply_attention_reuse
    from .schedule import as_schedule

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
        patched_before = {id(m) for m in pipe.unet.modules() if "forward" in vars(m)}
        loader(pipe)
        try:
            yield lambda prompts, generators: _images(pipe.tgate(prompts, generator=generators, gate_step=int(arg or 10),
                                                                 **kwargs))
        finally:  # T-GATE replaces the attention modules' forward (and keeps a cache) on the instances: undo it
            for module in pipe.unet.modules():
                if id(module) not in patched_before:
                    vars(module).pop("forward", None)
                    vars(module).pop("cache", None)
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
    elif name in ("fbc", "fastercache"):
        with _diffusers_cache(pipe, name, float(arg or 0.05)):
            yield run
    else:
        schedule = as_schedule(spec if name != "hurry" else f"hurry:{num_steps}:{arg}")
        with apply_attention_reuse(pipe, schedule):
            yield run


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
def _diffusers_cache(pipe, name: str, threshold: float):
    """diffusers' FirstBlockCache or FasterCache hooks on the UNet, removed on exit even when they fail."""
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, HookRegistry, apply_faster_cache,
                                 apply_first_block_cache)

    hooks = ("fbc_leader_block_hook", "fbc_block_hook", "faster_cache_denoiser", "faster_cache_block")
    try:
        try:
            if name == "fbc":
                apply_first_block_cache(pipe.unet, FirstBlockCacheConfig(threshold=threshold))
            else:
                apply_faster_cache(pipe.unet, FasterCacheConfig(current_timestep_callback=lambda: 500,
                                                                 attention_weight_callback=lambda _: 0.5))
            yield
        finally:
            registry = HookRegistry.check_if_exists_or_initialize(pipe.unet)
            for hook in hooks:
                registry.remove_hook(hook, recurse=True)
    except Exception as err:  # noqa: BLE001 - they target transformer denoisers: say so in the report
        raise PeerUnavailable(f"diffusers' {name} does not run on {type(pipe.unet).__name__}: "
                              f"{type(err).__name__}: {err}") from None
