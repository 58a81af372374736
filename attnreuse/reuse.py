"""`apply_reuse`: attach a reuse plan to a diffusers pipeline or model, and take it off.

Shaped like diffusers' cache hooks (`apply_pyramid_attention_broadcast`): a frozen config (`options`), one
`apply_*` function, and a small stateful handle with `reset` (`handle`). The plan is parsed once (in the config),
bound to the model's layers once (`layers.bind`), resolved into per-call actions per generation (`units.resolve`),
and installed with diffusers' own `set_processor` and instance-level wrappers (`install`); `remove` restores both
exactly. `apply_attention_reuse` is the same function under its first name.
"""

from __future__ import annotations

import logging

import torch

from .cache import LayerCache
from .first_use import FirstUse, checked_goal
from .handle import HANDLE_ATTR, AttentionReuseHandle
from .install import install_hooks, install_processors
from .layers import bind, find_model
from .options import AttentionReuseConfig
from .plan import Plan, Unit
from .state import StepTracker
from .units import resolve, slot_drops

logger = logging.getLogger(__name__)

__all__ = ["apply_reuse", "apply_attention_reuse", "AttentionReuseHelper"]


def apply_reuse(target, plan=None, *, scheduler=None, schedule=None, budget: float | None = None,
                target_psnr: float | None = None, calibration: int = 1, **options) -> AttentionReuseHandle:
    """Reuse work across denoising steps by a plan; the paper's attention-map reuse (Hunter, Dudziak et al. 2024,
    arXiv 2401.01008) is the plan of one attention unit.

    A plan (`attnreuse.Plan`) says per call what each unit (attention layers, transformer blocks, the UNet's branch,
    the whole call) computes or reuses. With the paper's schedule, at a compute step each selected attention layer
    computes A = softmax(Q K^T * scale); at a reuse step it skips Q, K and the softmax and applies the A of its last
    compute step to the current V.

    Args:
        target: a diffusers pipeline (its `unet` or `transformer` is patched; its scheduler tells where a
            generation starts and how many model calls it makes) or a model such as `UNet2DConditionModel`.
        plan: a `Plan`; or a schedule: list of 0/1 or string (``"110010"``, ``"hurry:N:R"``, a plan or schedule
            JSON path); or an `AttentionReuseConfig`. (`schedule=` is its first name.)
        scheduler (*optional*): for a bare model, the scheduler whose timesteps drive it. Without one, the plan
            counts model calls and a timestep going back up starts a new generation.
        budget, target_psnr (*optional*): instead of a plan, plan at first use (a pipeline only): the first
            `calibration` generations of each setup run the full sampler (the stock image) and are recorded, then
            a whole-call plan is made for a latency `budget` (a fraction of the full sampler's, as measured in those
            generations) or for the fewest computed calls that keep `target_psnr` dB of the final latents
            (predicted by replaying the sampler); it is kept under `$ATTNREUSE_CACHE`, so the next process starts
            planned. `stats()["plan_source"]` says where the plan in use came from.
        **options: `layers`, `attention`, `mode` (for a schedule), `cache_dtype`, `max_cache_bytes`, `kernels`, as
            in `AttentionReuseConfig`.

    With `torch.compile`, apply first and compile after (``pipe.unet = torch.compile(pipe.unet)``), or compile
    first and apply to the compiled module: the step hooks run outside the compiled graph either way, and each
    kind of call compiles once.

    Returns:
        `AttentionReuseHandle`: `remove()` restores the model, `reset()` clears the cache, `stats()` reports.

    >>> handle = apply_reuse(pipe, Plan.hurry(20, 10))
    >>> image = pipe("a red circle", num_inference_steps=20).images[0]
    >>> handle.remove()
    """
    first_use = _first_use(target, plan if plan is not None else schedule, budget, target_psnr, calibration)
    if first_use is not None:
        plan = Plan({"call": Unit("call", (1,), "output")})  # bound now; each generation's plan comes at its start
    config = _config(plan if plan is not None else schedule, options)
    model, get_scheduler = find_model(target)
    if scheduler is not None:
        get_scheduler = lambda: scheduler  # noqa: E731
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise ValueError("Reuse is already applied to this model; call handle.remove() first.")
    return _installed(target, model, config, get_scheduler, first_use)


def _installed(target, model, config: AttentionReuseConfig, get_scheduler, first_use) -> AttentionReuseHandle:
    """The plan bound to the model's layers, resolved once (a plan that cannot run on this model is refused here,
    before any sampling), and the handle installed."""
    plan, layout = bind(model, config)
    layers = list(layout.attention)

    resolutions = {}  # per fitted plan: every generation of one length reads the same action tuples

    def resolved(p: Plan) -> tuple[list, list]:
        key = tuple(p.units.items())
        if key not in resolutions:
            actions = resolve(p, layout, layers)
            resolutions[key] = actions, slot_drops(actions, layers, layout.modules)
        return resolutions[key]

    resolved(plan)
    handle = AttentionReuseHandle(model, config, plan, layout, StepTracker(plan, resolved, get_scheduler),
                                  LayerCache(tuple(layers), layout.modules, config.max_cache_bytes))
    if first_use is not None:
        handle.first_use = first_use.bound(model)
        handle.tracker.planner = first_use.plan_for
    handle.processors = install_processors(model, handle)
    handle.undo = install_hooks(target, model, handle)
    setattr(model, HANDLE_ATTR, handle)
    logger.debug("attnreuse: %s on %d layers and %d modules of %s", plan, len(layers), len(layout.modules),
                 type(model).__name__)
    return handle


apply_attention_reuse = apply_reuse  # its first name, for the paper's schedules


def _first_use(target, plan, budget, target_psnr, calibration: int) -> FirstUse | None:
    """Planning at first use when apply is given a goal instead of a plan (checked before the model is touched)."""
    if budget is None and target_psnr is None and calibration == 1:
        return None
    if plan is not None:
        raise TypeError("apply_reuse takes a plan or a goal to plan for at first use (budget=, target_psnr=, "
                        "calibration=), not both.")
    goal = checked_goal(budget, target_psnr, calibration)
    if isinstance(target, torch.nn.Module) or not hasattr(target, "scheduler"):
        raise TypeError("planning at first use (budget=, target_psnr=) needs a diffusers pipeline, whose scheduler "
                        f"it records; {type(target).__name__} is not one. Give a bare model a plan.")
    return FirstUse(target, *goal)


def _config(plan, options: dict) -> AttentionReuseConfig:
    if plan is None:
        raise TypeError("apply_reuse needs a plan: apply_reuse(pipe, plan), e.g. Plan.hurry(20, 10) or '1101...'.")
    if isinstance(plan, AttentionReuseConfig):
        if options:
            raise TypeError(f"Pass options in the AttentionReuseConfig, not both: {sorted(options)}.")
        return plan
    return AttentionReuseConfig(plan, **options)


class AttentionReuseHelper:
    """DeepCache-style helper over `apply_reuse`: ``set_params``, ``enable``, ``disable``.

    >>> helper = AttentionReuseHelper(pipe)
    >>> helper.set_params(plan="hurry:20:10")
    >>> helper.enable(); image = pipe(prompt, num_inference_steps=20).images[0]; helper.disable()
    """

    def __init__(self, pipe):
        self.pipe, self.params, self.handle = pipe, None, None

    def set_params(self, plan=None, *, schedule=None, **options) -> None:
        self.params = _config(plan if plan is not None else schedule, options)  # validated now, not at enable()
        if self.handle is not None:
            self.disable()
            self.enable()

    def enable(self) -> AttentionReuseHandle:
        if self.params is None:
            raise ValueError("Call set_params(plan=...) before enable().")
        if self.handle is not None:
            raise ValueError("Reuse is already enabled; call disable() first.")
        self.handle = apply_reuse(self.pipe, self.params)
        return self.handle

    def disable(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
