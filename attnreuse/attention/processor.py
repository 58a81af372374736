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
from diffusers.models import attention_processor as ap

from ..cache import AUTO, CROSS, MAP, NONE, OUTPUT, QK, LayerCache, Slot, slot_bytes
from ..state import REUSE, STORE, StepTracker
from .cpu_store import CoreThreads, map_store_cpu
from .kernel_check import kernel_ok
from .math import (
    FP8_SCALE,
    attention_map,
    context,
    enter,
    flat,
    leave,
    merge,
    output_via_map,
    pack,
    split,
    times_map,
    unscale,
)

__all__ = ["ReuseAttnProcessor", "SUPPORTED_PROCESSORS", "Conventions", "AUTO_MAP_MAX_PAIRS"]

# Processors whose math is plain softmax(Q K^T * scale) V; anything else (IP-Adapter, added KV, fused QKV...)
# would be silently changed at store and reuse calls, so it is refused at apply time.
SUPPORTED_PROCESSORS: tuple[type, ...] = tuple(
    getattr(ap, name)
    for name in ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor",
                 "AttnProcessorNPU")
    if hasattr(ap, name)
)
_DEFAULT_SCALE = tuple(getattr(ap, n) for n in ("AttnProcessor2_0", "AttnProcessorNPU") if hasattr(ap, n))

# `auto`: a self-attention layer keeps its map when the map has at most this many (query, key) pairs per head,
# else Q and K. On CUDA flash attention recomputes a map about as fast as A V reads it back (docs/BENCHMARKS.md,
# "Attention only"), so auto keeps Q and K there; on a CPU recomputing is the expensive part.
AUTO_MAP_MAX_PAIRS = {"cuda": 0, "cpu": 4096 * 4096}


class Conventions:
    """How the replaced processor computes Q, K, V and the scale: diffusers' SDPA processors scale by
    1/sqrt(head_dim) whatever `attn.scale` says, and only AttnProcessor2_0 applies the QK norms."""

    def __init__(self, original):
        self.default_scale = isinstance(original, _DEFAULT_SCALE)
        self.qk_norm = isinstance(original, ap.AttnProcessor2_0)

    def scale(self, attn, query: torch.Tensor) -> float:
        return query.shape[-1] ** -0.5 if self.default_scale else attn.scale

    def qkv(self, attn, x, text) -> tuple:
        """Q, K, V as (batch, heads, tokens, dim) and the scale."""
        norm_q, norm_k = (attn.norm_q, attn.norm_k) if self.qk_norm else (None, None)
        query = split(attn, attn.to_q(x), norm_q)
        return query, split(attn, attn.to_k(text), norm_k), split(attn, attn.to_v(text)), self.scale(attn, query)


def _mask(attn, mask, keys: int, batch: int, heads: bool):
    """The layer's mask for SDPA (batch, heads, queries, keys) or for the explicit map (batch*heads, ., keys)."""
    if mask is None:
        return None
    mask = attn.prepare_attention_mask(mask, keys, batch)
    return mask.view(batch, attn.heads, -1, mask.shape[-1]) if heads else mask


def _sdpa(attn, query, key, value, mask, scale):
    mask = _mask(attn, mask, key.shape[2], query.shape[0], heads=True)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


class ReuseAttnProcessor:
    """Attention with a cache slot per layer, following the handle's tracker (see the module docstring)."""

    def __init__(self, name: str, index: int, original, tracker: StepTracker, cache: LayerCache, mode: str = MAP,
                 cross: bool = False, cache_dtype=None, kernels: bool = True, threads: CoreThreads | None = None):
        self.name, self.index, self.original, self.tracker, self.cache = name, index, original, tracker, cache
        self.mode = CROSS if cross else mode  # cross-attention is the exact cross cache in every mode
        self.cache_dtype, self.kernels, self.threads = cache_dtype, kernels, threads
        self.conventions = Conventions(original)
        params = inspect.signature(original.__call__).parameters
        self._original_kwargs = {k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        action = self.tracker.now[self.index]
        slot = self.cache.get(self.name, self.tracker.call) if action == REUSE else None
        if action not in (STORE, REUSE) or (slot is not None and slot.kind == NONE):
            extra = {k: v for k, v in dict(kwargs, temb=temb).items() if k in self._original_kwargs and v is not None}
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **extra)
        x, residual, shape = enter(attn, hidden_states, temb)
        text = context(attn, x, encoder_hidden_states)
        if action == STORE:
            out = self._store(attn, x, text, attention_mask)
        else:
            out = self._reuse(attn, x, text, attention_mask, slot)
        return leave(attn, out, residual, shape)

    def _kind(self, attn, query, key) -> str:
        """What this layer keeps: its mode (auto resolved by map size), or under a budget what fits."""
        kind = self.mode
        if kind == AUTO:
            limit = AUTO_MAP_MAX_PAIRS.get(query.device.type, AUTO_MAP_MAX_PAIRS["cpu"])
            kind = MAP if query.shape[2] * key.shape[2] <= limit else QK
        budget = self.cache.budget
        if budget is None:
            return kind
        shapes = (tuple(query.shape), tuple(key.shape), query.dtype)
        return budget.choose(self.name, shapes, kind, lambda k: self._predicted(k, attn, query, key),
                             self.cache.slots, self.cache.memory)

    def _predicted(self, kind, attn, query, key) -> int:
        b, h, q, d = query.shape
        dtype = self.cache_dtype or query.dtype
        output = b * q * attn.to_out[0].out_features * query.element_size()
        qk = slot_bytes(Slot(QK, query=query, key=key))
        return {MAP: b * h * q * key.shape[2] * dtype.itemsize, QK: qk, OUTPUT: output, CROSS: qk + output,
                NONE: 0}[kind]

    def _store(self, attn, x, text, mask):
        query, key, value, scale = self.conventions.qkv(attn, x, text)
        kind = self._kind(attn, query, key)
        if kind == MAP:
            out, attn_map, factor = self._map_store(attn, query, key, value, mask, scale)
            out = attn.to_out[1](attn.to_out[0](out))
            self.cache.put(self.name, Slot(MAP, attn_map=attn_map, unscale=factor))
            return out
        out = merge(attn, _sdpa(attn, query, key, value, mask, scale))
        slot = {QK: Slot(QK, query=query, key=key), OUTPUT: Slot(OUTPUT, output=out),
                CROSS: Slot(CROSS, query=query, key=key, output=out), NONE: Slot(NONE)}[kind]
        self.cache.put(self.name, slot)
        return out

    def _map_store(self, attn, query, key, value, mask, scale):
        """(out (batch, queries, heads*dim), A (batch*heads, queries, keys) in the cache's dtype, the factor that
        undoes an fp8 scale or None)."""
        b, h, q, d = query.shape
        map_dtype = self.cache_dtype or query.dtype
        if (mask is None and not (attn.upcast_attention or attn.upcast_softmax) and self.kernels
                and kernel_ok("store", query, d, map_dtype)):
            out, attn_map = torch.ops.attnreuse.attention_with_map(query, key, value, scale, map_dtype in FP8_SCALE)
            return out.view(b, q, h * d), attn_map, unscale(map_dtype)
        if (query.device.type == "cpu" and mask is None and query.dtype == torch.float32
                and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and query.requires_grad)):
            attn_map = self.cache.memory.get(self.name, (b * h, q, key.shape[2]), map_dtype, query.device)
            out = map_store_cpu(query, key, value, scale, attn_map, FP8_SCALE.get(map_dtype), self.threads)
            factor = unscale(map_dtype)
        else:
            mask = _mask(attn, mask, key.shape[2], b, heads=False)
            out = attention_map(attn, flat(query), flat(key), mask, scale)
            attn_map, factor = pack(out, self.cache_dtype)
            out = (times_map(attn_map, flat(value), factor) if output_via_map(attn_map.dtype, out.dtype)
                   else torch.bmm(out, flat(value)))
        return out.view(b, h, q, d).transpose(1, 2).reshape(b, q, h * d), attn_map, factor

    def _reuse(self, attn, x, text, mask, slot: Slot):
        self._check(slot, attn.heads, x, text)
        if slot.kind == OUTPUT or (slot.kind == CROSS and not self.cache.changed[self.index]):
            return slot.output
        value = split(attn, attn.to_v(text))
        if slot.kind == MAP:
            b, h, k, d = value.shape
            if self.kernels and kernel_ok("reuse", value, d, slot.attn_map.dtype):
                factor = 1.0 if slot.unscale is None else slot.unscale
                out = torch.ops.attnreuse.apply_map(slot.attn_map, value, factor)
                return attn.to_out[1](attn.to_out[0](out.view(b, -1, h * d)))
            return merge(attn, times_map(slot.attn_map, flat(value), slot.unscale).view(b, h, -1, d))
        # qk, or cross-attention with a changed text
        scale = self.conventions.scale(attn, slot.query)
        return merge(attn, _sdpa(attn, slot.query, slot.key, value, mask, scale))

    def _check(self, slot: Slot, heads: int, x, text):
        """A reuse call must see the batch and tokens the store call kept: else the kept tensors would broadcast or
        fail inside torch."""
        if slot.kind == MAP:
            kept = (slot.attn_map.shape[0] / heads, slot.attn_map.shape[1], slot.attn_map.shape[2])
        elif slot.kind == OUTPUT:
            kept = (slot.output.shape[0], slot.output.shape[1], text.shape[1])
        else:
            kept = (slot.query.shape[0], slot.query.shape[2], slot.key.shape[2])
        if kept != (x.shape[0], x.shape[1], text.shape[1]):
            raise RuntimeError(
                f"attnreuse: layer {self.name!r} kept (batch, queries, keys) = {tuple(int(n) for n in kept)} at its "
                f"store call but call {self.tracker.call} has {(x.shape[0], x.shape[1], text.shape[1])}. The batch or "
                "resolution changed within one generation (e.g. CFG run as separate calls); run each as its own "
                "generation (handle.generation()) or reset the handle between such calls."
            )
