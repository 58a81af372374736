"""What each actor keeps between a store call and the reuse calls after it.

One slot per attention layer holds what its last store call kept (paper sec. 1.2); the batch dimension of a map
carries the CFG branches, so each branch keeps its own (paper footnote 2). Wrapped modules keep their output (for a
branch) or residual (for a blocks unit) under `output_key` and `residual_key`, and the call under `CALL`.
`MapMemory` keeps CPU map memory for the next store to write over, `CacheBudget` chooses what each attention layer
keeps under `max_cache_bytes`, and `LayerCounts` say what each layer did. `LayerCache` holds them together; the
processors and module wrappers write through `put` and read through `get`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .state import REUSE, SKIP, STORE

__all__ = ["MAP", "QK", "OUTPUT", "AUTO", "CROSS", "NONE", "MODES", "CALL", "Slot", "slot_bytes", "output_key",
           "residual_key", "LayerCounts", "MapMemory", "CacheBudget", "LayerCache"]

MAP, QK, OUTPUT, AUTO = "map", "qk", "output", "auto"  # what a self-attention layer keeps (`mode=`)
CROSS, NONE = "cross", "none"  # a cross-attention layer's exact output cache; nothing (the layer computes)
MODES = (MAP, QK, OUTPUT, AUTO)
FALLBACK = {MAP: QK, QK: NONE, OUTPUT: NONE, CROSS: NONE}  # what a layer keeps when its choice does not fit
CALL = "#call"  # the slot of the whole call's output or residual


def output_key(module: str) -> str:
    return module + "#output"


def residual_key(module: str) -> str:
    return module + "#residual"


class Slot(NamedTuple):
    """One layer's cache: a tuple, so that `torch.compile` traces it without guards on objects."""

    kind: str  # MAP, QK, OUTPUT, CROSS or NONE
    attn_map: torch.Tensor | None = None  # (batch*heads, queries, keys) in the cache's dtype
    unscale: float | None = None  # undoes an fp8 map's scale
    query: torch.Tensor | None = None  # (batch, heads, queries, dim)
    key: torch.Tensor | None = None
    output: object = None  # what an attention layer's projections return (`families`); a module's output
    tokens: tuple = ()  # an attention layer's (batch, queries, keys) at its store call


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def slot_bytes(slot: Slot) -> int:
    """Bytes one slot holds (tensors inside a module's output included)."""
    return sum(t.numel() * t.element_size() for t in _tensors(tuple(slot[1:])))


@dataclass
class LayerCounts:
    computed: int = 0  # calls that computed Q K^T (stores included)
    stored: int = 0  # of those, calls that kept something for later reuse
    reused: int = 0  # calls that used the cache
    skipped: int = 0  # calls at which the layer did not run (inside a reused call, branch or block)


class MapMemory:
    """CPU memory of each layer's map, written over by the layer's next store: new CPU memory costs page faults,
    where the CUDA caching allocator hands memory back at no cost. Not kept once a snapshot shares maps by reference
    (they must then never be overwritten)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self.recycle = True

    def get(self, name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        kept = self.buffers.get(name)
        if kept is not None and kept.shape == shape and kept.dtype == dtype and kept.device == device:
            return kept
        self.buffers.pop(name, None)
        new = torch.empty(shape, dtype=dtype, device=device)
        if self.recycle:
            self.buffers[name] = new
        return new

    def keep_only(self, names) -> None:
        for name in [n for n in self.buffers if n not in names]:
            del self.buffers[name]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())

    def reset(self) -> None:
        self.buffers, self.recycle = {}, True


class CacheBudget:
    """Under `max_cache_bytes`: what each layer keeps. A layer chooses at its first store with new shapes (its mode
    if it fits beside what the layers before it reserved, else a smaller kind, else nothing) and keeps that choice
    while its shapes stay. Only slots and reservations are read, so a compiled UNet does not recompile per
    generation."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.reserved: dict[str, tuple] = {}  # name -> (shapes, kind, bytes of its slot and kept memory)

    def choose(self, name: str, shapes: tuple, kind: str, size_of, slots: dict, memory: MapMemory) -> str:
        """The kind `name` keeps; `size_of(kind)` gives a kind's bytes."""
        entry = self.reserved.get(name)
        if entry is not None and entry[0] == shapes:
            return entry[1]
        for other in [n for n in self.reserved if n not in slots]:  # choose as a fresh handle would
            del self.reserved[other]
        memory.keep_only(slots)
        held = self.reserved_bytes(slots)
        while kind != NONE and held + size_of(kind) > self.max_bytes:
            kind = FALLBACK[kind]
        self.reserved[name] = (shapes, kind, size_of(kind))
        return kind

    def reserved_bytes(self, slots: dict) -> int:
        """Bytes the reservations cover, and any slot without one."""
        return (sum(entry[2] for entry in self.reserved.values())
                + sum(slot_bytes(slot) for name, slot in slots.items() if name not in self.reserved))

    def reset(self) -> None:
        self.reserved = {}


class LayerCache:
    """The slots of one handle's actors: attention layers (in the order of their actions), wrapped modules and the
    call; their kept memory, budget and counts."""

    def __init__(self, layers: tuple[str, ...], modules: tuple[str, ...] = (), max_cache_bytes: int | None = None):
        self.layers, self.modules = layers, modules
        self.memory = MapMemory()
        self.budget = None if max_cache_bytes is None else CacheBudget(max_cache_bytes)
        self.reset()

    def begin_call(self, actions: tuple, drops: tuple[str, ...], context) -> None:
        """Before a denoiser call: the slots no later call reads before it writes them anew go (`units.slot_drops`),
        and each attention layer that stores notes the text, each that reuses whether the text differs from its
        store call's (cross-attention then recomputes A V)."""
        for key in drops:
            self.slots.pop(key, None)
        text = (context, getattr(context, "_version", -1))
        changed = []
        for name, action in zip(self.layers, actions):
            if action == STORE:
                self._texts[name] = text
            stored = self._texts.get(name, (None, -1))
            changed.append(action == REUSE and (context is not stored[0] or text[1] != stored[1]))
        self.changed = tuple(changed)
        self._before = dict(self.slots)

    def end_call(self, actions: tuple) -> None:
        """After a denoiser call: count what each attention layer did, from its slot (a layer under a budget may
        keep nothing and compute at reuse calls)."""
        for name, action in zip(self.layers, actions):
            slot, counts = self.slots.get(name), self.counts[name]
            if action == SKIP:
                counts.skipped += 1
            elif action == REUSE and slot is not None and slot.kind != NONE:
                counts.reused += 1
            else:
                counts.computed += 1
            counts.stored += slot is not None and slot is not self._before.get(name) and slot.kind != NONE
        self._before = {}
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def put(self, name: str, slot: Slot) -> None:
        self.slots[name] = slot

    def get(self, name: str, call: int) -> Slot:
        slot = self.slots.get(name)
        if slot is None:
            raise RuntimeError(
                f"attnreuse: {name!r} must reuse at call {call} but holds nothing; it did not run at the compute "
                "call before it. Exclude it from the plan (layers=...) or check the plan."
            )
        return slot

    def free(self) -> None:
        self.slots.clear()
        self._texts = {}

    @property
    def nbytes(self) -> int:
        return sum(slot_bytes(slot) for slot in self.slots.values())

    def snapshot(self) -> tuple:
        """The slots (by reference: maps are never changed in place from then on) and the store calls' texts."""
        self.memory.recycle, self.memory.buffers = False, {}
        return dict(self.slots), dict(self._texts)

    def restore(self, snapshot: tuple) -> None:
        slots, texts = snapshot
        self.slots, self._texts = dict(slots), dict(texts)

    def reset(self) -> None:
        """Forget the slots, their kept memory, the budget's choices, the counts and the peak."""
        self.slots: dict[str, Slot] = {}
        self.memory.reset()
        if self.budget is not None:
            self.budget.reset()
        self.counts = {name: LayerCounts() for name in self.layers}
        self.peak_bytes, self.changed = 0, ()
        self._texts, self._before = {}, {}
