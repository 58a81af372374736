"""The forwards of the modules a plan reuses, wrapped on the instance (as diffusers' `HookRegistry` does).

A branch's layers return what they kept at the branch's last compute call; a transformer block adds the residual
it kept (output minus input) to the fresh input; the whole call returns its kept output, or adds its kept residual.
Each keeps the container its module returns (a tensor, a tuple, or a diffusers output class).
"""

from __future__ import annotations

import torch

from .cache import CALL, OUTPUT, LayerCache, Slot, output_key, residual_key
from .state import REUSE, SKIP, STORE, StepTracker

__all__ = ["ModuleForward", "CallForward", "sample_of", "with_sample"]

_INPUTS = ("hidden_states", "input_tensor", "sample", "x")


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


def _input(args, kwargs) -> torch.Tensor:
    if args:
        return args[0]
    return next(kwargs[name] for name in _INPUTS if name in kwargs)


def _check(name: str, kept, x: torch.Tensor, call: int) -> None:
    if sample_of(kept).shape[0] != x.shape[0]:
        raise RuntimeError(f"attnreuse: {name!r} kept a batch of {sample_of(kept).shape[0]} but call {call} has "
                           f"{x.shape[0]}. The batch changed within one generation (e.g. CFG run as separate calls); "
                           "run each as its own generation (handle.generation()).")


class ModuleForward:
    """A module's forward under a plan: its action at each call is `tracker.now[index]` (a `units.ModuleAction`)."""

    def __init__(self, name: str, index: int, original, tracker: StepTracker, cache: LayerCache):
        self.name, self.index, self.original, self.tracker, self.cache = name, index, original, tracker, cache

    def __call__(self, *args, **kwargs):
        action, x = self.tracker.now[self.index], _input(args, kwargs)
        if action.run == SKIP:
            kept = self.cache.get(output_key(self.name), self.tracker.call).output
            _check(self.name, kept, x, self.tracker.call)
            return kept
        if action.run == REUSE:
            kept = self.cache.get(residual_key(self.name), self.tracker.call).output
            _check(self.name, kept, x, self.tracker.call)
            out = with_sample(kept, sample_of(kept) + x)
        else:
            out = self.original(*args, **kwargs)
        if action.keep_residual:
            self.cache.put(residual_key(self.name), Slot(OUTPUT, output=with_sample(out, sample_of(out) - x)))
        if action.keep_output:
            self.cache.put(output_key(self.name), Slot(OUTPUT, output=out))
        return out


class CallForward:
    """The denoiser's forward under a plan's call unit: reuse returns the kept output (`mode="output"`) or adds the
    kept residual to the fresh input (`"residual"`)."""

    def __init__(self, original, tracker: StepTracker, cache: LayerCache, mode: str = "output"):
        self.original, self.tracker, self.cache, self.mode = original, tracker, cache, mode

    def __call__(self, *args, **kwargs):
        action, x = self.tracker.now[-1], _input(args, kwargs)
        if action == REUSE:
            kept = self.cache.get(CALL, self.tracker.call).output
            _check("the call", kept, x, self.tracker.call)
            return kept if self.mode == "output" else with_sample(kept, sample_of(kept) + x)
        out = self.original(*args, **kwargs)
        if action == STORE:
            kept = out if self.mode == "output" else with_sample(out, sample_of(out) - x)
            self.cache.put(CALL, Slot(OUTPUT, output=kept))
        return out
