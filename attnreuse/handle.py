"""`AttentionReuseHandle`: what `apply_reuse` returns, and what the step hooks call around every denoiser call.

It holds one patched model's step tracker and cache, starts and ends generations, and undoes the patch exactly
(`remove`). One handle serves one generation at a time: a call from another thread during a generation is refused.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

from .attention.cpu_store import CoreThreads
from .cache import MAP, LayerCache
from .options import AttentionReuseConfig
from .plan import Plan, Schedule, as_plan
from .state import StepTracker
from .stats import handle_stats
from .units import Layout

__all__ = ["AttentionReuseHandle", "HANDLE_ATTR"]

HANDLE_ATTR = "_attnreuse_handle"  # the model's handle while reuse is applied


class AttentionReuseHandle:
    """What `apply_reuse` returns: `remove()`, `reset()`, `stats()`, `generation()`; a context manager."""

    def __init__(self, model, config: AttentionReuseConfig, plan: Plan, layout: Layout, tracker: StepTracker,
                 cache: LayerCache):
        self.model, self.config, self.plan, self.layout = model, config, plan, layout
        self.tracker, self.cache = tracker, cache
        self.threads = CoreThreads()
        self.processors: dict = {}  # layer name -> (its module, our processor, the processor it had)
        self.undo: list = []  # hooks and instance attributes to take off in `remove`
        self._open = False  # a denoiser call has begun and not returned
        self.first_use = None  # planning at first use (`first_use.FirstUse`), when apply was given a goal

    @property
    def layers(self) -> list[str]:
        """The names of the attention layers that follow the plan."""
        return list(self.cache.layers)

    @property
    def active(self) -> bool:
        return getattr(self.model, HANDLE_ATTR, None) is self

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
        for module, ours, original in self.processors.values():
            if module.processor is ours:
                module.set_processor(original)
        for undo in reversed(self.undo):
            undo()
        self._open = False
        self.tracker.reset()
        self.cache.reset()
        self.threads.shutdown()
        if self.first_use is not None:
            self.first_use.close()
        delattr(self.model, HANDLE_ATTR)

    def stats(self) -> dict:
        """Counts per attention layer since apply or the last reset, the plan of the current (or last) generation
        (`schedule`: its bits, for a plan of one attention unit), and the bytes held in the cache now and at peak."""
        return handle_stats(self)

    @contextmanager
    def generation(self, plan=None, resume=None):
        """An explicit generation: it starts at the first call inside the block, following `plan` (a plan or a
        schedule for this handle's attention layers; else the handle's own), and ends on leaving the block, also
        when it raises. `resume`: a `snapshot()` to continue from (its calls so far must agree with `plan`)."""
        plan = self._own(plan)
        self.claim()
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
        self.claim()
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

    def claim(self) -> None:
        """Refuse a call from a thread other than the one running the generation."""
        owner = self.tracker.owner
        if self.tracker.in_generation and owner not in (None, threading.get_ident()):
            raise RuntimeError(f"attnreuse: this model is in a generation run by another thread ({owner}); one "
                               "patched model serves one generation at a time. Use one pipeline per thread.")

    def _own(self, plan) -> Plan:
        """`plan` for this handle: a schedule takes the mode and layers of the handle's attention unit; None is
        the handle's own plan."""
        if plan is None:
            return self.plan
        value = as_plan(plan)
        if not isinstance(value, Schedule):
            return value
        unit = self.plan.units.get("attention")
        return Plan.attention(value.bits, unit.mode if unit else MAP, unit.layers if unit else None, value.timesteps,
                              value.meta)

    def _check_processors(self) -> None:
        changed = [name for name, (module, ours, _) in self.processors.items() if module.processor is not ours]
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
