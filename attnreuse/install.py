"""Putting a handle on a model and taking it off: our processor on each attention layer of the plan, wrapped
forwards for its modules and its call, step hooks around every denoiser call, and on a pipeline the loop that
delimits a generation. Every change is recorded with what undoes it exactly (instance attributes only)."""

from __future__ import annotations

import inspect
import threading

import torch

from .attention import ReuseAttnProcessor, check_kernels
from .cache import AUTO, MAP
from .layers import family
from .wrappers import STREAMS, CallForward, ModuleForward, model_input

__all__ = ["install_processors", "install_hooks"]

_END_OF_CALL = "maybe_free_model_hooks"  # every diffusers pipeline calls it once, at the end of __call__


def install_processors(model, handle) -> dict:
    """Our processor on each attention layer of the plan: {name: (its module, our processor, the processor it had)}."""
    config, installed = handle.config, {}
    modes = {n: u.mode for u in handle.plan.units.values() if u.kind == "attention"
             for n in handle.layout.match(u.layers, handle.layout.attention)}
    for index, name in enumerate(handle.cache.layers):
        module = model.get_submodule(name)
        ours = ReuseAttnProcessor(name, index, module.processor, handle.tracker, handle.cache, modes[name],
                                  handle.layout.attention[name] == "cross", config.cache_dtype, config.kernels,
                                  handle.threads, family(model, name))
        installed[name] = (module, ours, module.processor)
        module.set_processor(ours)
    parameter = next(model.parameters(), None)
    if set(modes.values()) & {MAP, AUTO} and config.kernels and parameter is not None and parameter.is_cuda:
        check_kernels(parameter.device, parameter.dtype, [m.inner_dim // m.heads for m, _, _ in installed.values()],
                      config.cache_dtype)
    return installed


def install_hooks(target, model, handle) -> list:
    """Step hooks, wrapped module and call forwards, and the pipeline's loop guard; returns what undoes them."""
    return (_first_use_hooks(target, model, handle) + _step_hooks(model, handle) + _module_forwards(model, handle)
            + _pipeline_loop(target, handle))


def _first_use_hooks(target, model, handle) -> list:
    """For planning at first use: the denoiser's input and time (hooks that run before and after the step
    hooks), and the start of each pipeline call (its `check_inputs`, the first thing every pipeline does)."""
    first_use = handle.first_use
    if first_use is None:
        return []

    def before(module, args, kwargs):
        first_use.before_denoiser(model_input(args, kwargs))

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
             model.register_forward_hook(lambda *a: first_use.after_denoiser())]
    undo = [hook.remove for hook in hooks]
    check_inputs = getattr(target, "check_inputs", None)
    if callable(check_inputs):
        def started_then_check(*args, **kwargs):
            first_use.call_started()
            return check_inputs(*args, **kwargs)

        undo.append(_on_instance(target, "check_inputs", started_then_check))
    return undo


def _module_forwards(model, handle) -> list:
    """The forwards of the plan's modules and, for a call unit, of the model itself."""
    undo, first = [], len(handle.cache.layers)
    for j, name in enumerate(handle.layout.modules):
        module = model.get_submodule(name)
        undo.append(_on_instance(module, "forward", ModuleForward(name, first + j, module.forward, handle.tracker,
                                                                  handle.cache, STREAMS.get(type(module).__name__))))
    call = next((u for u in handle.plan.units.values() if u.kind == "call"), None)
    if call is not None:
        undo.append(_on_instance(model, "forward", CallForward(model.forward, handle.tracker, handle.cache)))
    return undo


def _step_hooks(model, handle) -> list:
    """Hooks before and after every denoiser call (also one that raises), run outside any compiled graph."""
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

    def __init__(self, bar, handle):
        self.bar, self.handle = bar, handle

    def __enter__(self):
        handle, tracker = self.handle, self.handle.tracker
        if tracker.in_generation and tracker.owner == threading.get_ident():
            raise RuntimeError("attnreuse: a pipeline call started inside another one's generation (e.g. from its "
                               "callback); one patched pipeline runs one generation at a time.")
        handle.claim()
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


def _pipeline_loop(target, handle) -> list:
    """On a pipeline, generations begin and end with its denoising loop and end with its call."""
    end_of_call = None if isinstance(target, torch.nn.Module) else getattr(target, _END_OF_CALL, None)
    if not callable(end_of_call):
        return []
    progress_bar = target.progress_bar

    def free_then_end_of_call(*args, **kwargs):  # a generation that stopped early frees its cache too
        handle.end_generation()
        done = end_of_call(*args, **kwargs)
        if handle.first_use is not None:
            handle.first_use.call_ended()
        return done

    return [_on_instance(target, _END_OF_CALL, free_then_end_of_call),
            _on_instance(target, "progress_bar", lambda *a, **k: _LoopGuard(progress_bar(*a, **k), handle)),
            _serialised(target)]


def _serialised(target):
    """A patched pipeline runs one call at a time: a call from a second thread waits for the first to return (the
    stock pipeline's calls share its scheduler too, but reuse also shares a cache). `__call__` is looked up on the
    class, so the instance gets a subclass of its own class (same name) for as long as reuse is applied; the undo
    gives it its class back."""
    cls, lock = type(target), threading.RLock()  # re-entrant: a call from a callback meets the loop guard's error

    def __call__(self, *args, **kwargs):
        with lock:
            return cls.__call__(self, *args, **kwargs)

    target.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                    "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return lambda: setattr(target, "__class__", cls)
