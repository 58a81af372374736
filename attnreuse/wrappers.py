"""The forwards of the modules a plan reuses, wrapped on the instance (as diffusers' `HookRegistry` does).

A branch's layers return what they kept at the branch's last compute call; a transformer block adds the residual
it kept (output minus input) to the fresh input; the whole call returns its kept output, or adds its kept residual.
Each keeps the container its module returns (a tensor, a tuple, or a diffusers output class).
"""

from __future__ import annotations

import inspect

import torch

from .cache import CALL, OUTPUT, LayerCache, Slot, output_key, residual_key
from .state import REUSE, SKIP, STORE, StepTracker

__all__ = ["ModuleForward", "CallForward", "STREAMS", "sample_of", "with_sample", "model_input"]

_INPUTS = ("hidden_states", "input_tensor", "sample", "x")
# Blocks that return several streams: the input each returned entry is the residual of (SD3 and Flux blocks return
# (encoder_hidden_states, hidden_states)); any other module's first returned tensor is the residual of its first input.
STREAMS = {name: ("encoder_hidden_states", "hidden_states")
           for name in ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")}


def sample_of(output) -> torch.Tensor:
    """The tensor a module returns: itself, or the first entry of a tuple or a diffusers output."""
    return output if isinstance(output, torch.Tensor) else output[0]


def with_sample(output, tensor: torch.Tensor):
    """`output` with its tensor replaced, in the same container."""
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    first = next(iter(output.keys()))
    return type(output)(**{**output, first: tensor})


def model_input(args, kwargs) -> torch.Tensor:
    """The latents a denoiser or module is called on: its first argument, by position or by name."""
    if args:
        return args[0]
    return next((kwargs[name] for name in _INPUTS if name in kwargs), None)


def _check(name: str, kept, x: torch.Tensor, call: int) -> None:
    entries = (kept,) if isinstance(kept, torch.Tensor) else kept.values() if isinstance(kept, dict) else kept
    kept = next(t for t in entries if isinstance(t, torch.Tensor))
    if kept.shape[0] != x.shape[0]:
        raise RuntimeError(f"attnreuse: {name!r} kept a batch of {kept.shape[0]} but call {call} has "
                           f"{x.shape[0]}. The batch changed within one generation (e.g. CFG run as separate calls); "
                           "run each as its own generation (handle.generation()).")


class Streams:
    """A module's residual: output minus input, per stream for the blocks of `STREAMS`."""

    def __init__(self, module_forward, names: tuple | None):
        self.names = names
        params = list(inspect.signature(module_forward).parameters) if names else []
        self.positions = tuple(params.index(n) for n in names) if names else ()  # found once: no inspect when traced

    def inputs(self, args, kwargs) -> tuple:
        if self.names is None:
            return (model_input(args, kwargs),)
        return tuple(kwargs[n] if n in kwargs else args[i] for n, i in zip(self.names, self.positions))

    def minus(self, out, inputs: tuple):
        if self.names is None:
            return with_sample(out, sample_of(out) - inputs[0])
        return tuple(None if o is None else o - i for o, i in zip(out, inputs))

    def plus(self, kept, inputs: tuple):
        if self.names is None:
            return with_sample(kept, sample_of(kept) + inputs[0])
        return tuple(None if k is None else k + i for k, i in zip(kept, inputs))


class ModuleForward:
    """A module's forward under a plan: its action at each call is `tracker.now[index]` (a `units.ModuleAction`)."""

    def __init__(self, name: str, index: int, original, tracker: StepTracker, cache: LayerCache, streams=None):
        self.name, self.index, self.original, self.tracker, self.cache = name, index, original, tracker, cache
        self.streams = Streams(original, streams)

    def __call__(self, *args, **kwargs):
        action, inputs = self.tracker.now[self.index], self.streams.inputs(args, kwargs)
        if action.run == SKIP:
            kept = self.cache.get(output_key(self.name), self.tracker.call).output
            _check(self.name, kept, inputs[-1], self.tracker.call)
            return kept
        if action.run == REUSE:
            kept = self.cache.get(residual_key(self.name), self.tracker.call).output
            _check(self.name, kept, inputs[-1], self.tracker.call)
            out = self.streams.plus(kept, inputs)
        else:
            out = self.original(*args, **kwargs)
        if action.keep_residual:
            self.cache.put(residual_key(self.name), Slot(OUTPUT, output=self.streams.minus(out, inputs)))
        if action.keep_output:
            self.cache.put(output_key(self.name), Slot(OUTPUT, output=out))
        return out


class CallForward:
    """The denoiser's forward under a plan's call unit: reuse returns the kept output (`mode="output"`) or adds the
    kept residual to the fresh input (`"residual"`)."""

    def __init__(self, original, tracker: StepTracker, cache: LayerCache):
        self.original, self.tracker, self.cache = original, tracker, cache

    def __call__(self, *args, **kwargs):
        action, x, self.mode = self.tracker.now[-1], model_input(args, kwargs), self.tracker.call_mode
        if action == REUSE:
            kept = self.cache.get(CALL, self.tracker.call).output
            _check("the call", kept, x, self.tracker.call)
            return kept if self.mode == "output" else with_sample(kept, sample_of(kept) + x)
        out = self.original(*args, **kwargs)
        if action == STORE and self.mode == "residual" and sample_of(out).shape != x.shape:
            raise ValueError(f"attnreuse: the model returns {tuple(sample_of(out).shape)} for an input of "
                             f"{tuple(x.shape)} (e.g. a learned variance), so it has no residual to reuse; give the "
                             "plan's call unit mode 'output'.")
        if action == STORE:
            kept = out if self.mode == "output" else with_sample(out, sample_of(out) - x)
            self.cache.put(CALL, Slot(OUTPUT, output=kept))
        return out
