"""`apply_reuse`: attach a reuse plan (or the paper's schedule) to a diffusers pipeline or model, and take it off.

Shaped like diffusers' cache hooks (`apply_pyramid_attention_broadcast`): a frozen config dataclass, one `apply_*`
function, and a small stateful handle with `reset`. Attention processors are swapped with diffusers' own
`set_processor`, and the forwards of the modules a plan reuses are wrapped on their instances; `remove` restores
both exactly. `apply_attention_reuse` is the same function under its first name.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .attention import ReuseAttnProcessor, check_kernels, family_of
from .attention.cpu_store import CoreThreads
from .cache import AUTO, MAP, MODES, LayerCache, slot_bytes
from .plan import Plan, plan_or_schedule
from .schedule import Schedule, whole_number
from .state import StepTracker
from .units import Layout, branch_layers, resolve, slot_drops, transformer_blocks
from .wrappers import STREAMS, CallForward, ModuleForward

logger = logging.getLogger(__name__)

__all__ = ["AttentionReuseConfig", "AttentionReuseHandle", "AttentionReuseHelper", "apply_reuse",
           "apply_attention_reuse", "attention_layers", "denoiser"]

_ATTENTION_KINDS = ("all", "self", "cross")
_HANDLE_ATTR = "_attnreuse_handle"
_END_OF_CALL = "maybe_free_model_hooks"  # every diffusers pipeline calls it once, at the end of __call__


@dataclass(frozen=True)
class AttentionReuseConfig:
    """What to reuse, and when.

    Args:
        schedule (`Plan`, `Schedule`, list of 0/1, or str): a plan (see `attnreuse.Plan`), or the paper's schedule:
            1 = compute, 0 = reuse, one entry per denoiser call, or per sampler step for samplers that call the
            model twice a step. Strings: ``"110010"``, ``"hurry:N:R"``, or a path to a schedule or plan JSON.
        layers (`tuple[str]`, *optional*, defaults to all): for a schedule, layer names or glob patterns, e.g.
            ``"up_blocks.3.*"`` or ``"mid_block.attentions.0.transformer_blocks.0.attn1"``. Each must match.
        attention (`str`, *optional*, defaults to ``"all"``): for a schedule, ``"all"``, ``"self"`` or ``"cross"``.
        mode (`str`, *optional*, defaults to ``"map"``): for a schedule, what a self-attention layer keeps for its
            reuse calls. ``"map"``: A, the paper's method. ``"qk"``: Q and K (the same A up to rounding,
            recomputed by flash attention at reuse; memory linear in tokens). ``"output"``: the attention output
            itself (PAB-style broadcast, not the paper's method). ``"auto"``: the map where it is small, else Q and
            K. Cross-attention is an exact output cache in every mode.

    Args to tinker with:
        cache_dtype (`torch.dtype`, *optional*, defaults to the model's dtype): dtype the maps are kept in
            (``torch.float16`` halves the cache; ``torch.float8_e4m3fn`` halves it again, stored scaled so that
            small probabilities survive). On a CPU with AMX, ``torch.bfloat16`` also makes reuse calls faster.
            With a 16-bit map in another dtype than the model's, a store call's output is the kept map times V,
            as a reuse computes it.
        max_cache_bytes (`int`, *optional*): the attention cache, with the map memory kept for the next store,
            never holds more. A layer whose choice would not fit beside the layers before it keeps something
            smaller (map -> Q and K) or nothing (it then computes at reuse calls), chosen at its first store from
            shapes alone. What modules keep for a plan's branch, blocks and call units is not counted.
        kernels (`bool`, *optional*, defaults to `True`): use the Triton store and reuse kernels where they pass
            their check on this GPU; `False` runs plain torch (to measure one against the other).
    """

    schedule: Plan | Schedule
    layers: tuple[str, ...] | None = None
    attention: str = "all"
    cache_dtype: torch.dtype | None = None
    mode: str = MAP
    max_cache_bytes: int | None = None
    kernels: bool = True

    def __post_init__(self):
        object.__setattr__(self, "schedule", plan_or_schedule(self.schedule))  # validated now, not at apply
        object.__setattr__(self, "layers", _layer_patterns(self.layers))
        if self.attention not in _ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {_ATTENTION_KINDS}, got {self.attention!r}.")
        if self.cache_dtype is not None and not (isinstance(self.cache_dtype, torch.dtype)
                                                 and self.cache_dtype.is_floating_point):
            raise ValueError(f"cache_dtype must be a floating torch.dtype such as torch.float16, got "
                             f"{self.cache_dtype!r}.")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.max_cache_bytes is not None:
            object.__setattr__(self, "max_cache_bytes", whole_number(self.max_cache_bytes, "max_cache_bytes"))
        if not isinstance(self.kernels, bool):
            raise TypeError(f"kernels must be True or False, got {self.kernels!r}.")


def _layer_patterns(layers) -> tuple[str, ...] | None:
    """The layer filter as a tuple of names or patterns (None: every layer)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = (layers,)
    elif not isinstance(layers, (list, tuple, set, frozenset)):
        raise TypeError(f"layers must be a layer name, a pattern or a list of them, got {type(layers).__name__}.")
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers=[] selects no layer; pass layers=None (the default) for every layer.")
    bad = [p for p in layers if not isinstance(p, str) or not p]
    if bad:
        raise TypeError(f"layers holds {bad[0]!r}; each entry is a layer name or a glob pattern (a string).")
    return layers


def denoiser(target) -> torch.nn.Module:
    """The denoiser of a pipeline (its `unet` or `transformer`), or the model itself."""
    return _find_model(target)[0]


def _find_model(target):
    """The denoiser of a pipeline (`unet` or `transformer`) or the model itself, and a scheduler getter."""
    if isinstance(target, torch.nn.Module):
        return target, (lambda: None)
    for attr in ("unet", "transformer"):
        model = getattr(target, attr, None)
        if isinstance(model, torch.nn.Module):
            return model, (lambda: getattr(target, "scheduler", None))  # looked up per call: users swap schedulers
    raise TypeError(
        f"apply_reuse needs a diffusers pipeline with a `unet` or `transformer`, or a model; "
        f"got {type(target).__name__}."
    )


def attention_layers(target) -> dict[str, str]:
    """Names of the attention layers of a pipeline or model, each with ``"self"`` or ``"cross"``."""
    model, _ = _find_model(target)
    processors = getattr(model, "attn_processors", None)
    if not processors:
        raise ValueError(f"{type(model).__name__} has no diffusers attention layers, so there is nothing to reuse.")
    names = [key.removesuffix(".processor") for key in processors]
    return {n: "cross" if getattr(model.get_submodule(n), "is_cross_attention", False) else "self" for n in names}


def _matching(names: list[str], patterns, model, what: str) -> list[str]:
    """The names that the patterns match; each pattern must match one."""
    chosen = set()
    for pattern in patterns:
        hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern) or n.startswith(pattern + ".")]
        if not hits:
            examples = ", ".join(repr(n) for n in names[:3])
            raise ValueError(f"Layer filter {pattern!r} matches no {what} of {type(model).__name__}. Names look like "
                             f"{examples} (see attnreuse.attention_layers).")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def _family(model, name: str):
    """The processor family (`attention.families`) of layer `name`, or a ValueError that says why it has none."""
    attn = model.get_submodule(name)
    family = family_of(attn, attn.processor)
    if isinstance(family, str):
        raise ValueError(f"Layer {name!r} {family}. Set a supported processor (e.g. "
                         "model.set_attn_processor(AttnProcessor2_0())) or leave the layer out with layers=...")
    return family


def _plan(model, config: AttentionReuseConfig) -> Plan:
    """The config's plan on this model: a schedule becomes one attention unit over the layers the filters select;
    a plan's units must each name layers the model has."""
    if isinstance(config.schedule, Schedule):
        kinds = attention_layers(model)
        names = [n for n, kind in kinds.items() if config.attention in ("all", kind)]
        if config.layers is not None:
            names = _matching(names, config.layers, model, f"{config.attention} attention layer")
        if not names:
            raise ValueError(f"{type(model).__name__} has no {config.attention}-attention layers to reuse.")
        return Plan.from_schedule(config.schedule, config.mode, names)
    plan = config.schedule
    for name, unit in plan.units.items():
        if unit.layers is not None and unit.kind in ("attention", "blocks"):
            pool = list(attention_layers(model)) if unit.kind == "attention" else transformer_blocks(model)
            _matching(pool, unit.layers, model, f"{unit.kind} layer (unit {name!r})")
    return plan


def _layout(model, plan: Plan) -> Layout:
    """The actors of `plan` on `model`: attention layers in attention units, blocks in blocks units, the branch."""
    units = list(plan.units.values())
    attention = {}
    if any(u.kind == "attention" for u in units):
        kinds = attention_layers(model)
        for unit in (u for u in units if u.kind == "attention"):
            attention.update({n: kinds[n] for n in (unit.layers and _matching(list(kinds), unit.layers, model,
                                                                              "attention layer")) or kinds})
    pool = transformer_blocks(model)
    blocks = [n for u in units if u.kind == "blocks"
              for n in (_matching(pool, u.layers, model, "block") if u.layers else pool)]
    producers, mid, up = branch_layers(model) if any(u.kind == "branch" for u in units) else ((), None, ())
    if any(u.kind == "branch" for u in units) and not up:
        raise ValueError(f"this plan has a branch unit, but {type(model).__name__} is not a UNet whose branch can be "
                         "reused.")
    for name in attention:
        _family(model, name)
    return Layout(attention, tuple(dict.fromkeys(blocks)), producers, mid, up)


class AttentionReuseHandle:
    """What `apply_reuse` returns: `remove()`, `reset()`, `stats()`, `generation()`; a context manager.

    It holds the step tracker and the cache of one patched model, and is what the step hooks call. One handle
    serves one generation at a time: a call from another thread during a generation is refused.
    """

    def __init__(self, model, config: AttentionReuseConfig, plan: Plan, layout: Layout, tracker: StepTracker,
                 cache: LayerCache):
        self.model, self.config, self.plan, self.layout = model, config, plan, layout
        self.tracker, self.cache = tracker, cache
        self.threads = CoreThreads()
        self._processors: dict = {}  # layer name -> (its module, our processor, the processor it had)
        self._undo: list = []  # hooks and instance attributes to take off in `remove`
        self._open = False  # a denoiser call has begun and not returned

    @property
    def layers(self) -> list[str]:
        """The names of the attention layers that follow the plan."""
        return list(self.cache.layers)

    @property
    def active(self) -> bool:
        return getattr(self.model, _HANDLE_ATTR, None) is self

    def reset(self) -> None:
        """Clear the cache, the position in the plan and the counts (the next call starts a generation). Refused
        during a generation, whose next calls would reuse what it clears."""
        if self.tracker.in_generation and not self._open:
            raise RuntimeError(f"attnreuse: reset() during a generation (after call {self.tracker.call + 1} of "
                               f"{len(self.tracker.actions)}) would drop maps its next calls reuse; call it between "
                               "generations (a pipeline call frees the cache by itself).")
        self.tracker.reset()
        self.cache.reset()
        self._open = False

    def remove(self) -> None:
        """Give every patched layer back the processor it had (layers whose processor was changed since keep the
        new one), unwrap the modules, and remove the step hooks."""
        if not self.active:
            return
        for module, ours, original in self._processors.values():
            if module.processor is ours:
                module.set_processor(original)
        for undo in reversed(self._undo):
            undo()
        self._open = False
        self.tracker.reset()
        self.cache.reset()
        self.threads.shutdown()
        delattr(self.model, _HANDLE_ATTR)

    def stats(self) -> dict:
        """Counts per attention layer since apply or the last reset, the plan of the current (or last) generation
        (`schedule`: its bits, for a schedule), and the bytes held in the cache now and at peak."""
        cache, running = self.cache, self.tracker.running
        units = running.units if running is not None else {}
        only = units.get("attention") if len(units) == 1 else None
        return {
            "generations": self.tracker.generations, "calls_in_generation": self.tracker.call + 1,
            "plan": str(running or ""), "schedule": "".join(map(str, only.bits)) if only else "",
            "cache_bytes": cache.nbytes, "peak_cache_bytes": cache.peak_bytes, "kept_buffer_bytes": cache.memory.nbytes,
            "layers": {name: {"attention": self.layout.attention[name], **vars(cache.counts[name]),
                              "cache": cache.slots[name].kind if name in cache.slots else None,
                              "cache_bytes": slot_bytes(cache.slots[name]) if name in cache.slots else 0}
                       for name in cache.layers},
        }

    @contextmanager
    def generation(self, plan=None, resume=None):
        """An explicit generation: it starts at the first call inside the block, following `plan` (a plan or a
        schedule for this handle's attention layers; else the handle's own), and ends on leaving the block, also
        when it raises. `resume`: a `snapshot()` to continue from (its calls so far must agree with `plan`)."""
        plan = _for_handle(self.plan, plan)
        self._claim()
        if resume is None:
            self.tracker.start(plan, explicit=True)
            self.cache.free()
        else:
            self.tracker.restore(resume[0], plan)
            self.cache.restore(resume[1])
        try:
            yield self
        finally:
            self.end_generation()

    def snapshot(self) -> tuple:
        """Where the generation stands (plan, call index, slots by reference), to resume with `generation`."""
        return self.tracker.snapshot(), self.cache.snapshot()

    def before_call(self, timestep, context) -> None:
        """The step hook before every denoiser call (outside any compiled region)."""
        if self._open:  # the previous call raised past the hooks (KeyboardInterrupt): its generation is over
            self.end_generation()
        self._claim()
        if self.tracker.before_call(timestep):
            self.cache.free()
            self._check_processors()
        self.cache.begin_call(self.tracker.now, self.tracker.drops[self.tracker.call], context)
        self._open = True

    def after_call(self, output) -> None:
        """The step hook after every denoiser call, also one that raised (`output` None): counts, and the cache
        freed after a generation's last call or a failed one."""
        self._open = False
        if output is None:
            self.end_generation()
            return
        self.cache.end_call(self.tracker.now)
        if self.tracker.last_call:
            self.cache.free()
            self.tracker.finish()

    def end_generation(self) -> None:
        """The generation is over (its pipeline call returned, stopped early or raised): free the cache. Only the
        thread running the generation can end it."""
        if self.tracker.owner in (None, threading.get_ident()):
            self.cache.free()
            self.tracker.end()
            self._open = False

    def _claim(self) -> None:
        owner = self.tracker.owner
        if self.tracker.in_generation and owner not in (None, threading.get_ident()):
            raise RuntimeError(f"attnreuse: this model is in a generation run by another thread ({owner}); one "
                               "patched model serves one generation at a time. Use one pipeline per thread.")

    def _check_processors(self) -> None:
        changed = [name for name, (module, ours, _) in self._processors.items() if module.processor is not ours]
        if changed:
            self.tracker.end()
            raise RuntimeError(f"attnreuse: the attention processors of {len(changed)} patched layers (e.g. "
                               f"{changed[0]!r}) were changed after apply (set_attn_processor, attention slicing); "
                               "call handle.remove(), change them, then apply again.")

    def __enter__(self) -> AttentionReuseHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"AttentionReuseHandle({self.plan}, layers={len(self.cache.layers)}, active={self.active})"


def _for_handle(own: Plan, plan) -> Plan:
    """`plan` as a plan for a handle whose own plan is `own`: a schedule takes the mode and layers of its attention
    unit; None is `own`."""
    if plan is None:
        return own
    value = plan_or_schedule(plan)
    if isinstance(value, Plan):
        return value
    unit = own.units.get("attention")
    return Plan.from_schedule(value, unit.mode if unit else MAP, unit.layers if unit else None)


def _install_processors(model, handle: AttentionReuseHandle) -> dict:
    """Our processor on each attention layer of the plan: {name: (its module, our processor, the processor it had)}."""
    config, installed = handle.config, {}
    modes = {n: u.mode for u in handle.plan.units.values() if u.kind == "attention"
             for n in handle.layout.match(u.layers, handle.layout.attention)}
    for index, name in enumerate(handle.cache.layers):
        module = model.get_submodule(name)
        ours = ReuseAttnProcessor(name, index, module.processor, handle.tracker, handle.cache, modes[name],
                                  handle.layout.attention[name] == "cross", config.cache_dtype, config.kernels,
                                  handle.threads, _family(model, name))
        installed[name] = (module, ours, module.processor)
        module.set_processor(ours)
    parameter = next(model.parameters(), None)
    if set(modes.values()) & {MAP, AUTO} and config.kernels and parameter is not None and parameter.is_cuda:
        check_kernels(parameter.device, parameter.dtype, [m.inner_dim // m.heads for m, _, _ in installed.values()],
                      config.cache_dtype)
    return installed


def _install_modules(model, handle: AttentionReuseHandle) -> list:
    """The forwards of the plan's modules and, for a call unit, of the model itself; returns what undoes them."""
    undo, first = [], len(handle.cache.layers)
    for j, name in enumerate(handle.layout.modules):
        module = model.get_submodule(name)
        undo.append(_on_instance(module, "forward", ModuleForward(name, first + j, module.forward, handle.tracker,
                                                                  handle.cache, STREAMS.get(type(module).__name__))))
    call = next((u for u in handle.plan.units.values() if u.kind == "call"), None)
    if call is not None:
        undo.append(_on_instance(model, "forward", CallForward(model.forward, handle.tracker, handle.cache,
                                                               call.mode)))
    return undo


def _install_step_hooks(model, handle: AttentionReuseHandle) -> list:
    """Hooks before and after every denoiser call (also one that raises), run outside any compiled graph; returns
    what undoes them."""
    forward = getattr(model, "_orig_mod", model).forward  # a compiled model's hooks see the inner signature
    params = list(inspect.signature(forward).parameters)

    def argument(args, kwargs, name):
        if name in kwargs:
            return kwargs[name]
        index = params.index(name) if name in params else None
        return args[index] if index is not None and len(args) > index else None

    @torch.compiler.disable
    def before(module, args, kwargs):
        handle.before_call(argument(args, kwargs, "timestep"), argument(args, kwargs, "encoder_hidden_states"))

    @torch.compiler.disable
    def after(module, args, output):
        handle.after_call(output)

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, always_call=True)]
    return [hook.remove for hook in hooks]


class _LoopGuard:
    """A pipeline's progress bar, which its denoising loop runs inside: entering it starts a pipeline call's
    generation, leaving it (normally, early or by an exception) ends the generation."""

    def __init__(self, bar, handle: AttentionReuseHandle):
        self.bar, self.handle = bar, handle

    def __enter__(self):
        handle, tracker = self.handle, self.handle.tracker
        if tracker.in_generation and tracker.owner == threading.get_ident():
            raise RuntimeError("attnreuse: a pipeline call started inside another one's generation (e.g. from its "
                               "callback); one patched pipeline runs one generation at a time.")
        handle._claim()
        tracker.end()
        tracker.strict = True
        return self.bar.__enter__()

    def __exit__(self, *exc):
        self.handle.end_generation()
        return self.bar.__exit__(*exc)

    def __iter__(self):
        return iter(self.bar)

    def __getattr__(self, name):
        return getattr(self.bar, name)


def _on_instance(target, name: str, value):
    """Set an attribute on the instance only; returns what restores the instance exactly."""
    missing = object()
    before = target.__dict__.get(name, missing)
    setattr(target, name, value)
    return lambda: target.__dict__.pop(name, None) if before is missing else setattr(target, name, before)


def _wrap_pipeline(target, handle: AttentionReuseHandle) -> list:
    """On a pipeline, generations begin and end with its denoising loop and end with its call; returns what undoes
    the wrappers (instance attributes only)."""
    end_of_call = None if isinstance(target, torch.nn.Module) else getattr(target, _END_OF_CALL, None)
    if not callable(end_of_call):
        return []
    progress_bar = target.progress_bar

    def free_then_end_of_call(*args, **kwargs):  # a generation that stopped early frees its cache too
        handle.end_generation()
        return end_of_call(*args, **kwargs)

    return [_on_instance(target, _END_OF_CALL, free_then_end_of_call),
            _on_instance(target, "progress_bar", lambda *a, **k: _LoopGuard(progress_bar(*a, **k), handle))]


def apply_reuse(target, schedule, *, scheduler=None, **options) -> AttentionReuseHandle:
    """Reuse work across denoising steps by a plan, or reuse attention maps by the paper's schedule (Hunter, Dudziak
    et al. 2024, arXiv 2401.01008).

    With a schedule, at a compute step each selected attention layer computes A = softmax(Q K^T * scale); at a
    reuse step it skips Q, K and the softmax and applies the A of its last compute step to the current V. A plan
    (`attnreuse.Plan`) says per call what each unit (attention layers, transformer blocks, the UNet's branch, the
    whole call) computes or reuses.

    Args:
        target: a diffusers pipeline (its `unet` or `transformer` is patched; its scheduler tells where a
            generation starts and how many model calls it makes) or a model such as `UNet2DConditionModel`.
        schedule: a `Plan`, a `Schedule`, list of 0/1, string (see `AttentionReuseConfig`), or an
            `AttentionReuseConfig`.
        scheduler (*optional*): for a bare model, the scheduler whose timesteps drive it. Without one, the plan
            counts model calls and a timestep going back up starts a new generation.
        **options: `layers`, `attention`, `mode`, `cache_dtype`, `max_cache_bytes`, `kernels`, as in
            `AttentionReuseConfig`.

    With `torch.compile`, apply first and compile after (``pipe.unet = torch.compile(pipe.unet)``), or compile
    first and apply to the compiled module: the step hooks run outside the compiled graph either way, and each
    kind of call compiles once.

    Returns:
        `AttentionReuseHandle`: `remove()` restores the model, `reset()` clears the cache, `stats()` reports.

    >>> handle = apply_reuse(pipe, Schedule.hurry(20, 10))
    >>> image = pipe("a red circle", num_inference_steps=20).images[0]
    >>> handle.remove()
    """
    if isinstance(schedule, AttentionReuseConfig):
        if options:
            raise TypeError(f"Pass options in the AttentionReuseConfig, not both: {sorted(options)}.")
        config = schedule
    else:
        config = AttentionReuseConfig(schedule, **options)
    model, get_scheduler = _find_model(target)
    if scheduler is not None:
        get_scheduler = lambda: scheduler  # noqa: E731
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise ValueError("Reuse is already applied to this model; call handle.remove() first.")
    plan = _plan(model, config)
    layout = _layout(model, plan)
    layers = list(layout.attention)
    def resolved(p: Plan) -> tuple[list, list]:
        actions = resolve(p, layout, layers)
        return actions, slot_drops(actions, layers, layout.modules)

    resolved(plan)  # a plan that cannot run on this model is refused here, before any sampling
    handle = AttentionReuseHandle(model, config, plan, layout, StepTracker(plan, resolved, get_scheduler),
                                  LayerCache(tuple(layers), layout.modules, config.max_cache_bytes))
    handle._processors = _install_processors(model, handle)
    handle._undo = (_install_step_hooks(model, handle) + _install_modules(model, handle)
                    + _wrap_pipeline(target, handle))
    setattr(model, _HANDLE_ATTR, handle)
    logger.debug("attnreuse: %s on %d layers and %d modules of %s", plan, len(layers), len(layout.modules),
                 type(model).__name__)
    return handle


apply_attention_reuse = apply_reuse  # its first name, for the paper's schedules


class AttentionReuseHelper:
    """DeepCache-style helper over `apply_reuse`: ``set_params``, ``enable``, ``disable``.

    >>> helper = AttentionReuseHelper(pipe)
    >>> helper.set_params(schedule="hurry:20:10")
    >>> helper.enable(); image = pipe(prompt, num_inference_steps=20).images[0]; helper.disable()
    """

    def __init__(self, pipe):
        self.pipe, self.params, self.handle = pipe, None, None

    def set_params(self, schedule, **options) -> None:
        self.params = AttentionReuseConfig(schedule, **options)  # validated now, not at enable()
        if self.handle is not None:
            self.disable()
            self.enable()

    def enable(self) -> AttentionReuseHandle:
        if self.params is None:
            raise ValueError("Call set_params(schedule=...) before enable().")
        if self.handle is not None:
            raise ValueError("Reuse is already enabled; call disable() first.")
        self.handle = apply_reuse(self.pipe, self.params)
        return self.handle

    def disable(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
