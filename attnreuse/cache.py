"""Per-generation state: where the sampler is, what each call does, and the cached maps.

One slot per attention layer holds the map of that layer's last compute call (paper sec. 1.2). The batch
dimension of the map carries the CFG branches, so each branch keeps its own map (paper footnote 2).
A compute call stores its map only when the next call reuses it; any other compute runs the model's own
fast attention, and the cache is freed when a generation ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .schedule import Schedule

logger = logging.getLogger(__name__)

COMPUTE, STORE, REUSE = "compute", "store", "reuse"
# what a layer's slot keeps: the modes of `processors`, a cross-attention cache, or nothing (it computes instead)
MAP, QK, OUTPUT, AUTO = "map", "qk", "output", "auto"
CROSS, NONE = "cross", "none"


def _scalar(timestep) -> float | None:
    """The timestep of a denoiser call as a float (a batch of timesteps shares one value in a sampler)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)


def plan_actions(bits: tuple[int, ...]) -> tuple[str, ...]:
    """Per call: REUSE at a 0, STORE at a 1 whose next call reuses (lookahead), else COMPUTE."""
    last = len(bits) - 1
    return tuple(
        REUSE if b == 0 else STORE if s < last and bits[s + 1] == 0 else COMPUTE for s, b in enumerate(bits)
    )


def slot_bytes(slot: tuple) -> int:
    """Bytes one layer's cache slot holds. A slot is (kind, tensors..., [fp8 unscale factor]), kind one of
    processors.MODES/CROSS/NONE; a plain tuple so that `torch.compile` traces it without guards on objects."""
    return sum(t.numel() * t.element_size() for t in slot[1:] if isinstance(t, torch.Tensor))


@dataclass
class LayerCounts:
    computed: int = 0  # calls that computed Q K^T (stores included)
    stored: int = 0  # of those, calls that kept something (map, Q and K, or output) for later reuse
    reused: int = 0  # calls that used the cache


@dataclass
class ReuseState:
    """Step tracking and cache for one `apply_attention_reuse` handle.

    A step is one call of the denoiser. A new generation starts when the scheduler's `timesteps` is a new
    object (every pipeline call runs `set_timesteps`), when the previous generation has made all its calls
    or its pipeline call has returned, or, for a bare model without a scheduler, when the timestep goes back up.
    """

    schedule: Schedule
    get_scheduler: Callable[[], object] = lambda: None
    cache_dtype: torch.dtype | None = None
    layers: tuple[str, ...] = ()
    max_cache_bytes: int | None = None
    context_changed: bool = False  # the text differs from the store call's: cross-attention recomputes A V
    plan: tuple[str, ...] = ()
    call: int = -1
    action: str = COMPUTE
    generations: int = 0
    peak_bytes: int = 0
    slots: dict[str, tuple] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # CPU map memory, see `buffer`
    reserved: dict[str, tuple] = field(default_factory=dict)  # under a budget, see `reservation`
    counts: dict[str, LayerCounts] = field(default_factory=dict)
    _before: dict[str, tuple] = field(default_factory=dict)
    _context: tuple = (None, -1)  # the encoder states of the last store call, and their version
    _timesteps_ref: object = None
    _last_t: float | None = None
    _ended: bool = False
    _recycle: bool = True  # False once a snapshot shares maps by reference: they must then never be overwritten

    def __post_init__(self):
        self.counts = {name: LayerCounts() for name in self.layers}

    # -- step tracking --------------------------------------------------------------------------
    def before_call(self, timestep, context=None) -> None:
        """Called before every denoiser call (outside any compiled region): start a generation if one begins
        here, pick the action, and note whether the text (`context`) is the one the cache was made with."""
        scheduler = self.get_scheduler()
        timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
        finished = self._ended or self.call + 1 >= len(self.plan)
        if timesteps is not None:
            if finished or timesteps is not self._timesteps_ref:
                self._timesteps_ref = timesteps
                self.start(self._resolve(scheduler, timesteps, timestep))
        else:
            t = _scalar(timestep)  # bare model: one read of the timestep per call
            if finished or (t is not None and self._last_t is not None and t > self._last_t):
                self.start(self.schedule.bits)
            self._last_t = t
        self.call += 1
        self.action = self.plan[self.call]
        version = getattr(context, "_version", -1)
        if self.action == STORE:
            # every layer stores anew: the old slots go first, so the cache never holds two of a layer, and every
            # store call starts from the same (empty) cache, as a compiled UNet needs to keep one store graph
            self.slots.clear()
            self._context = (context, version)
        self.context_changed = self.action == REUSE and (context is not self._context[0]
                                                         or version != self._context[1])
        self._before = dict(self.slots)

    def after_call(self) -> None:
        """Called after every denoiser call: count what each layer did (from the cache itself, so the counts
        cannot disagree with it), and free the cache once the generation's last call is done."""
        for name in self.layers:
            slot, counts = self.slots.get(name), self.counts[name]
            if self.action == REUSE and slot is not None and slot[0] != NONE:
                counts.reused += 1
            else:
                counts.computed += 1
            counts.stored += slot is not None and slot is not self._before.get(name) and slot[0] != NONE
        self._before = {}
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        if self.call == len(self.plan) - 1:
            self.free()

    def end_generation(self) -> None:
        """The pipeline call is over (it may have stopped early: `denoising_end`, an interrupt): free the cache."""
        self.free()
        self._ended = True

    def start(self, bits: tuple[int, ...]) -> None:
        self.free()
        self.plan = plan_actions(tuple(bits))
        self.call = -1
        self._ended = False
        self.generations += 1

    def snapshot(self) -> tuple:
        """Where the generation stands: its plan, call index and cached maps (by reference; maps are never
        changed in place from then on). `restore` continues from here, so a schedule search can branch from a
        shared prefix."""
        self._recycle, self.buffers = False, {}
        return self.plan, self.call, dict(self.slots), self._last_t, self._context

    def restore(self, snapshot: tuple, plan: tuple[str, ...] | None = None) -> None:
        """Continue from `snapshot`, optionally with another plan that agrees with it on the calls made so far."""
        self.plan, self.call, slots, self._last_t, self._context = snapshot
        self.slots, self._ended = dict(slots), False
        if plan is not None:
            self.plan = plan

    def _resolve(self, scheduler, timesteps, timestep) -> tuple[int, ...]:
        """The schedule for this generation's model calls, from the scheduler's timesteps (checked here,
        before the first call runs)."""
        begin = getattr(scheduler, "begin_index", None)
        all_ts = [float(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]  # one sync
        if begin is None:  # img2img without set_begin_index: find where this generation enters the schedule
            t = _scalar(timestep)
            t = all_ts[0] if t is None else t
            begin = min(range(len(all_ts)), key=lambda i: abs(all_ts[i] - t))
        call_ts = all_ts[begin:]
        order = int(getattr(scheduler, "order", 1) or 1)
        try:
            return self.schedule.expand(len(call_ts), order).bits
        except ValueError:
            if self.schedule.timesteps is None:
                raise
        logger.info("attnreuse: moving %r from %d to %d steps by timestep", self.schedule, len(self.schedule),
                    len(call_ts))
        return self.schedule.for_timesteps(call_ts).bits

    # -- cache ----------------------------------------------------------------------------------
    def get(self, name: str) -> tuple:
        slot = self.slots.get(name)
        if slot is None:
            raise RuntimeError(
                f"attnreuse: layer {name!r} must reuse at call {self.call} but holds no map; the layer did not "
                "run at the compute call before it. Exclude it with layers=... or check the schedule."
            )
        return slot

    def free(self) -> None:
        self.slots.clear()
        self._context = (None, -1)

    def buffer(self, name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        """Memory for a layer's new CPU map: the memory of its previous map, written over, when the shape and dtype
        match. Writing a map into new CPU memory costs about 0.5 s per GiB more on the development Xeon (page faults;
        docs/BENCHMARKS.md), where the CUDA caching allocator would hand memory back at no cost. The memory stays
        with the handle between generations (`reset`/`remove` give it back; under a budget it is counted in the
        layer's `reservation`); it is not kept after a snapshot (maps shared by reference)."""
        kept = self.buffers.get(name)
        if kept is not None and kept.shape == shape and kept.dtype == dtype and kept.device == device:
            return kept
        self.buffers.pop(name, None)
        new = torch.empty(shape, dtype=dtype, device=device)
        if self._recycle:
            self.buffers[name] = new
        return new

    def reservation(self, name: str, key: tuple) -> str | None:
        """Under `max_cache_bytes`: the kind this layer keeps, or None when it must choose anew. A layer chooses at
        its first store with new shapes (`key`) and keeps that choice while its shapes stay. Before it chooses, the
        layers that have not stored in this generation (no slot) drop their reservations and kept memory, so the
        choices are those of a fresh handle. Only the slots and the reservations are read, so a compiled UNet does
        not recompile per generation."""
        entry = self.reserved.get(name)
        if entry is not None and entry[0] == key:
            return entry[1]
        for other in [n for n in self.reserved if n not in self.slots]:
            del self.reserved[other]
        for other in [n for n in self.buffers if n not in self.slots]:
            del self.buffers[other]
        return None

    def reserve(self, name: str, key: tuple, kind: str, nbytes: int) -> None:
        self.reserved[name] = (key, kind, nbytes)

    @property
    def reserved_bytes(self) -> int:
        """Bytes the reservations cover (each a layer's slot and kept memory), and any slot without one. A choice
        fits beside this, so the cache and its kept memory stay within the budget."""
        return (sum(entry[2] for entry in self.reserved.values())
                + sum(slot_bytes(slot) for name, slot in self.slots.items() if name not in self.reserved))

    @property
    def buffer_bytes(self) -> int:
        """Bytes of map memory kept for reuse; the cache's maps live in it (not added to `nbytes`)."""
        return sum(t.numel() * t.element_size() for t in self.buffers.values())

    @property
    def nbytes(self) -> int:
        return sum(slot_bytes(slot) for slot in self.slots.values())

    def reset(self) -> None:
        """Forget the cache (its kept memory included), the position in the schedule and the counts."""
        self.free()
        self.buffers, self.reserved, self._recycle = {}, {}, True
        self.plan, self.call, self.action = (), -1, COMPUTE
        self.generations, self.peak_bytes, self.context_changed = 0, 0, False
        self._timesteps_ref, self._last_t, self._ended = None, None, False
        self.counts = {name: LayerCounts() for name in self.layers}
