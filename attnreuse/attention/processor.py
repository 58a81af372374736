"""The attention processor that computes, stores or reuses attention, in one of three modes per layer.

map     the paper's method: a store call keeps A = softmax(Q K^T * scale); a reuse call applies it to fresh V.
qk      keeps Q and K instead of A: a reuse call runs flash attention with the fresh V. The same map up to
        rounding; memory grows with tokens, not tokens squared; it saves only the Q and K projections.
output  keeps the layer's attention output and returns it (PAB-style broadcast): not the paper's method; the
        cheapest reuse and the largest change.
Cross-attention is an exact output cache in every mode: its V comes from the text, which is constant within a
generation, so A V cannot change; Q and K are kept as well, so that a changed text still gets A_kept V_new.
A compute call whose cache no later call reads runs the layer's own processor, so a schedule without reuse gives
exactly the unpatched model's output, and every other compute keeps flash attention.

The processor reads only its entry of the current call's actions, its entry of the cache's `changed` flags and its
slot, and keeps no counters: under `torch.compile` each kind of call is one graph, with no recompilation per step.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..cache import AUTO, CROSS, MAP, NONE, OUTPUT, QK, LayerCache, Slot, slot_bytes
from ..state import REUSE, STORE, StepTracker
from .cpu_store import CoreThreads, map_store_cpu
from .families import FAMILIES, Frame, Standard
from .kernel_check import kernel_ok
from .math import FP8_SCALE, attention_map, flat, output_via_map, pack, times_map, unscale

__all__ = ["ReuseAttnProcessor", "SUPPORTED_PROCESSORS", "AUTO_MAP_MAX_PAIRS"]

# Processors whose math a family (`families`) reproduces; anything else (IP-Adapter, fused QKV...) would be
# silently changed at store and reuse calls, so it is refused at apply time.
SUPPORTED_PROCESSORS: tuple[type, ...] = tuple(FAMILIES)

# `auto`: a self-attention layer keeps its map when the map has at most this many (query, key) pairs per head,
# else Q and K. On CUDA flash attention recomputes a map about as fast as A V reads it back (docs/BENCHMARKS.md,
# "Attention only"), so auto keeps Q and K there; on a CPU recomputing is the expensive part.
AUTO_MAP_MAX_PAIRS = {"cuda": 0, "cpu": 4096 * 4096}


def _upcast(attn) -> bool:
    return getattr(attn, "upcast_attention", False) or getattr(attn, "upcast_softmax", False)


class ReuseAttnProcessor:
    """Attention with a cache slot per layer, following the handle's tracker (see the module docstring); `family`
    (`families`) says how the replaced processor builds Q, K, V and its output."""

    def __init__(self, name: str, index: int, original, tracker: StepTracker, cache: LayerCache, mode: str = MAP,
                 cross: bool = False, cache_dtype=None, kernels: bool = True, threads: CoreThreads | None = None,
                 family=None):
        self.name, self.index, self.original, self.tracker, self.cache = name, index, original, tracker, cache
        self.mode = CROSS if cross else mode  # cross-attention is the exact cross cache in every mode
        self.cache_dtype, self.kernels, self.threads = cache_dtype, kernels, threads
        self.family = family or Standard(original)
        params = inspect.signature(original.__call__).parameters
        self._original_kwargs = {k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, temb=None,
                 image_rotary_emb=None, rotary_emb=None, **kwargs):
        action = self.tracker.now[self.index]
        slot = self.cache.get(self.name, self.tracker.call) if action == REUSE else None
        named = dict(kwargs, temb=temb, image_rotary_emb=image_rotary_emb, rotary_emb=rotary_emb)
        if action not in (STORE, REUSE) or (slot is not None and slot.kind == NONE):
            extra = {k: v for k, v in named.items() if k in self._original_kwargs and v is not None}
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **extra)
        frame = self.family.call_frame(attn, hidden_states, encoder_hidden_states, args, temb, image_rotary_emb,
                                       rotary_emb)
        if action == STORE:
            projected = self._store(attn, frame, attention_mask)
        else:
            projected = self._reuse(attn, frame, attention_mask, slot)
        return self.family.leave(attn, projected, frame)

    def _kind(self, query, key) -> str:
        """What this layer keeps: its mode (auto resolved by map size), or under a budget what fits."""
        kind = self.mode
        if kind == AUTO:
            limit = AUTO_MAP_MAX_PAIRS.get(query.device.type, AUTO_MAP_MAX_PAIRS["cpu"])
            kind = MAP if query.shape[2] * key.shape[2] <= limit else QK
        budget = self.cache.budget
        if budget is None:
            return kind
        shapes = (tuple(query.shape), tuple(key.shape), query.dtype)
        return budget.choose(self.name, shapes, kind, lambda k: self._predicted(k, query, key),
                             self.cache.slots, self.cache.memory)

    def _predicted(self, kind, query, key) -> int:
        """Bytes a slot of `kind` would hold (an output counted as one (batch, queries, heads*dim) tensor)."""
        b, h, q, d = query.shape
        dtype = self.cache_dtype or query.dtype
        output = b * q * h * d * query.element_size()
        qk = slot_bytes(Slot(QK, query=query, key=key))
        return {MAP: b * h * q * key.shape[2] * dtype.itemsize, QK: qk, OUTPUT: output, CROSS: qk + output,
                NONE: 0}[kind]

    def _sdpa(self, attn, query, key, value, mask, scale) -> torch.Tensor:
        """Flash (or SDPA) attention, (batch, queries, heads*dim)."""
        mask = self.family.mask(attn, mask, query, key, heads=True)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).flatten(2)

    def _store(self, attn, frame: Frame, mask):
        query, key, value = self.family.qkv_of(attn, frame)
        scale, tokens = self.family.scale(attn, query), self.family.tokens(frame)
        kind = self._kind(query, key)
        if kind == MAP:
            out, attn_map, factor = self._map_store(attn, query, key, value, mask, scale)
            self.cache.put(self.name, Slot(MAP, attn_map=attn_map, unscale=factor, tokens=tokens))
            return self.family.project(attn, out, frame)
        out = self.family.project(attn, self._sdpa(attn, query, key, value, mask, scale), frame)
        slot = {QK: Slot(QK, query=query, key=key), OUTPUT: Slot(OUTPUT, output=out),
                CROSS: Slot(CROSS, query=query, key=key, output=out), NONE: Slot(NONE)}[kind]
        self.cache.put(self.name, slot._replace(tokens=tokens))
        return out

    def _map_store(self, attn, query, key, value, mask, scale):
        """(out (batch, queries, heads*dim), A (batch*heads, queries, keys) in the cache's dtype, the factor that
        undoes an fp8 scale or None)."""
        b, h, q, d = query.shape
        map_dtype = self.cache_dtype or query.dtype
        if mask is None and not _upcast(attn) and self.kernels and kernel_ok("store", query, d, map_dtype):
            out, attn_map = torch.ops.attnreuse.attention_with_map(query, key, value, scale, map_dtype in FP8_SCALE)
            return out.view(b, q, h * d), attn_map, unscale(map_dtype)
        if (query.device.type == "cpu" and mask is None and query.dtype == torch.float32
                and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and query.requires_grad)):
            attn_map = self.cache.memory.get(self.name, (b * h, q, key.shape[2]), map_dtype, query.device)
            out = map_store_cpu(query, key, value, scale, attn_map, FP8_SCALE.get(map_dtype), self.threads)
            factor = unscale(map_dtype)
        else:
            mask = self.family.mask(attn, mask, query, key, heads=False)
            out = attention_map(attn, flat(query), flat(key), mask, scale)
            attn_map, factor = pack(out, self.cache_dtype)
            out = (times_map(attn_map, flat(value), factor) if output_via_map(attn_map.dtype, out.dtype)
                   else torch.bmm(out, flat(value)))
        return out.view(b, h, q, d).transpose(1, 2).reshape(b, q, h * d), attn_map, factor

    def _reuse(self, attn, frame: Frame, mask, slot: Slot):
        self._check(slot, self.family.tokens(frame))
        if slot.kind == OUTPUT or (slot.kind == CROSS and not self.cache.changed[self.index]):
            return slot.output
        value = self.family.value(attn, frame)
        if slot.kind == MAP:
            b, h, k, d = value.shape
            if self.kernels and kernel_ok("reuse", value, d, slot.attn_map.dtype):
                factor = 1.0 if slot.unscale is None else slot.unscale
                out = torch.ops.attnreuse.apply_map(slot.attn_map, value, factor).view(b, -1, h * d)
            else:
                out = times_map(slot.attn_map, flat(value), slot.unscale).view(b, h, -1, d).transpose(1, 2).flatten(2)
            return self.family.project(attn, out, frame)
        # qk, or cross-attention with a changed text
        scale = self.family.scale(attn, slot.query)
        return self.family.project(attn, self._sdpa(attn, slot.query, slot.key, value, mask, scale), frame)

    def _check(self, slot: Slot, now: tuple):
        """A reuse call must see the batch and tokens the store call kept: else the kept tensors would broadcast or
        fail inside torch."""
        if slot.tokens != now:
            raise RuntimeError(
                f"attnreuse: layer {self.name!r} kept (batch, queries, keys) = {tuple(int(n) for n in slot.tokens)} "
                f"at its store call but call {self.tracker.call} has {tuple(int(n) for n in now)}. The batch or "
                "resolution changed within one generation (e.g. CFG run as separate calls); run each as its own "
                "generation (handle.generation()) or reset the handle between such calls."
            )
