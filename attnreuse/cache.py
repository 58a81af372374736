"""What each attention layer keeps between a store call and the reuse calls after it.

One slot per layer holds what its last store call kept (paper sec. 1.2); the batch dimension of a map carries the
CFG branches, so each branch keeps its own (paper footnote 2). `MapMemory` keeps CPU map memory for the next store
to write over, `CacheBudget` chooses what each layer keeps under `max_cache_bytes`, and `LayerCounts` say what each
layer did. `LayerCache` holds them together; the processors write through `put` and read through `get`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .state import REUSE, STORE

__all__ = ["MAP", "QK", "OUTPUT", "AUTO", "CROSS", "NONE", "MODES", "Slot", "slot_bytes", "LayerCounts",
           "MapMemory", "CacheBudget", "LayerCache"]

MAP, QK, OUTPUT, AUTO = "map", "qk", "output", "auto"  # what a self-attention layer keeps (`mode=`)
CROSS, NONE = "cross", "none"  # a cross-attention layer's exact output cache; nothing (the layer computes)
MODES = (MAP, QK, OUTPUT, AUTO)
FALLBACK = {MAP: QK, QK: NONE, OUTPUT: NONE, CROSS: NONE}  # what a layer keeps when its choice does not fit


class Slot(NamedTuple):
    """One layer's cache: a tuple, so that `torch.compile` traces it without guards on objects."""

    kind: str  # MAP, QK, OUTPUT, CROSS or NONE
    attn_map: torch.Tensor | None = None  # (batch*heads, queries, keys) in the cache's dtype
    unscale: float | None = None  # undoes an fp8 map's scale
    query: torch.Tensor | None = None  # (batch, heads, queries, dim)
    key: torch.Tensor | None = None
    output: torch.Tensor | None = None  # (batch, queries, channels), after to_out


def slot_bytes(slot: Slot) -> int:
    """Bytes one slot holds."""
    return sum(t.numel() * t.element_size() for t in slot[1:] if isinstance(t, torch.Tensor))


@dataclass
class LayerCounts:
    computed: int = 0  # calls that computed Q K^T (stores included)
    stored: int = 0  # of those, calls that kept something for later reuse
    reused: int = 0  # calls that used the cache


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
    """The slots of one handle's layers, their kept memory, budget and counts."""

    def __init__(self, layers: tuple[str, ...], max_cache_bytes: int | None = None):
        self.layers = layers
        self.memory = MapMemory()
        self.budget = None if max_cache_bytes is None else CacheBudget(max_cache_bytes)
        self.reset()

    def begin_call(self, action: str, context) -> None:
        """Before a denoiser call: a store call lets the previous slots go first (so the cache never holds two of a
        layer, and every store starts from the same empty cache, as a compiled model needs); a reuse call notes
        whether the text differs from the store call's (cross-attention then recomputes A V)."""
        version = getattr(context, "_version", -1)
        if action == STORE:
            self.slots.clear()
            self._context = (context, version)
        self.context_changed = action == REUSE and (context is not self._context[0]
                                                    or version != self._context[1])
        self._before = dict(self.slots)

    def end_call(self, action: str) -> None:
        """After a denoiser call: count what each layer did, from the slots themselves."""
        for name in self.layers:
            slot, counts = self.slots.get(name), self.counts[name]
            if action == REUSE and slot is not None and slot.kind != NONE:
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
                f"attnreuse: layer {name!r} must reuse at call {call} but holds no map; the layer did not run at "
                "the compute call before it. Exclude it with layers=... or check the schedule."
            )
        return slot

    def free(self) -> None:
        self.slots.clear()
        self._context = (None, -1)

    @property
    def nbytes(self) -> int:
        return sum(slot_bytes(slot) for slot in self.slots.values())

    def snapshot(self) -> tuple:
        """The slots (by reference: maps are never changed in place from then on) and the store call's text."""
        self.memory.recycle, self.memory.buffers = False, {}
        return dict(self.slots), self._context

    def restore(self, snapshot: tuple) -> None:
        slots, self._context = snapshot
        self.slots = dict(slots)

    def reset(self) -> None:
        """Forget the slots, their kept memory, the budget's choices, the counts and the peak."""
        self.slots: dict[str, Slot] = {}
        self.memory.reset()
        if self.budget is not None:
            self.budget.reset()
        self.counts = {name: LayerCounts() for name in self.layers}
        self.peak_bytes, self.context_changed = 0, False
        self._context, self._before = (None, -1), {}
