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

The processor reads only `state.action`, `state.context_changed` and the slot dict, and keeps no counters: under
`torch.compile` each kind of call (compute, store, reuse) is one graph, with no recompilation per step.
"""

from __future__ import annotations

import inspect
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from diffusers.models import attention_processor as ap

from .cache import AUTO, COMPUTE, CROSS, MAP, NONE, OUTPUT, QK, REUSE, STORE, ReuseState, slot_bytes

logger = logging.getLogger(__name__)

__all__ = ["ReuseAttnProcessor", "SUPPORTED_PROCESSORS", "MODES", "CROSS", "NONE"]

# Processors whose math is plain softmax(Q K^T * scale) V; anything else (IP-Adapter, added KV, fused QKV...)
# would be silently changed at store and reuse calls, so it is refused at apply time.
SUPPORTED_PROCESSORS: tuple[type, ...] = tuple(
    getattr(ap, name)
    for name in ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU")
    if hasattr(ap, name)
)

_DEFAULT_SCALE = tuple(getattr(ap, n) for n in ("AttnProcessor2_0", "AttnProcessorNPU") if hasattr(ap, n))

MODES = (MAP, QK, OUTPUT, AUTO)
_FALLBACK = {MAP: QK, QK: NONE, OUTPUT: NONE, CROSS: NONE}  # what a layer keeps when its first choice would
# not fit in `max_cache_bytes`; NONE computes at reuse calls

# `auto`: a self-attention layer keeps its map when the map has at most this many (query, key) pairs per head,
# else Q and K, per device type, from docs/BENCHMARKS.md. On an H100 (fp16) flash attention recomputes a map
# faster than A V can read it back at every SD1.5/SDXL layer size (largest SD1.5 layer: 0.215 ms against
# 0.298 ms), so auto keeps Q and K there. On a CPU recomputing is the expensive part, so maps are kept.
AUTO_MAP_MAX_PAIRS = {"cuda": 0, "cpu": 4096 * 4096}

# fp8 maps are kept as A * scale so that probabilities of about 1/tokens stay normal numbers (e4m3's smallest
# normal is 2^-6); A <= 1, so the scale is the format's largest value.
_FP8_SCALE = {getattr(torch, n): torch.finfo(getattr(torch, n)).max
              for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}


def _enter(attn, hidden_states: torch.Tensor, temb):
    """Input side of a diffusers attention layer: spatial norm, 4-D to tokens, group norm."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = None
    if hidden_states.ndim == 4:
        shape = hidden_states.shape
        b, c, h, w = shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, residual, shape


def _exit(attn, projected: torch.Tensor, residual: torch.Tensor, shape) -> torch.Tensor:
    """Output side: back to 4-D, residual connection, rescale (after `to_out`)."""
    if shape is not None:
        projected = projected.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        projected = projected + residual
    factor = attn.rescale_output_factor
    return projected if factor == 1.0 else projected / factor  # a division by 1 would be one launch per layer


def _context(attn, hidden_states, encoder_hidden_states):
    if encoder_hidden_states is None:
        return hidden_states
    if attn.norm_cross:
        return attn.norm_encoder_hidden_states(encoder_hidden_states)
    return encoder_hidden_states


def _heads(attn, x: torch.Tensor, norm=None) -> torch.Tensor:
    """(batch, tokens, heads * dim) -> (batch * heads, tokens, dim), with the optional per-head norm."""
    x = attn.head_to_batch_dim(x)
    return norm(x) if norm is not None else x


def _split(attn, x: torch.Tensor, norm=None) -> torch.Tensor:
    """(batch, tokens, heads * dim) -> (batch, heads, tokens, dim) as a view (no copy), as AttnProcessor2_0."""
    x = x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
    return norm(x) if norm is not None else x


def _attention_map(attn, query: torch.Tensor, key: torch.Tensor, mask, scale: float, perturb=None) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) as diffusers' `Attention.get_attention_scores` (upcasting included), but
    with the scale the layer's own processor applies. `perturb` (analyses only) maps the logits before the mask
    is added."""
    dtype = query.dtype
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    folded = mask if perturb is None else None  # the mask goes into baddbmm unless the bare logits are needed
    if folded is None:
        folded, beta = torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype,
                                   device=query.device), 0
    else:
        beta = 1
    scores = torch.baddbmm(folded, query, key.transpose(-1, -2), beta=beta, alpha=scale)
    if attn.upcast_softmax:
        scores = scores.float()
    if perturb is not None:
        scores = perturb(scores)
        if mask is not None:
            scores = scores + mask
    return scores.softmax(dim=-1).to(dtype)


def _project_out(attn, out: torch.Tensor) -> torch.Tensor:
    out = attn.batch_to_head_dim(out)
    return attn.to_out[1](attn.to_out[0](out))


def _merge(attn, out: torch.Tensor) -> torch.Tensor:
    """(batch, heads, queries, dim) -> to_out((batch, queries, heads * dim))."""
    out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
    return attn.to_out[1](attn.to_out[0](out))


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, dim) -> (batch * heads, tokens, dim)."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


_BLOCK = 1 << 20  # scores in one block of the CPU store (4 MiB of fp32); of 2^18 to 2^21, tried ad hoc on the
# development Xeon, 2^20 and 2^21 were the fastest
_POOL: dict[tuple, ThreadPoolExecutor] = {}  # the CPU store's worker threads by (process, thread count): a forked
# child has none of its parent's threads


def _on_cores(work, count: int) -> None:
    """Run `work(items)` over `range(count)` split into contiguous parts, one per intra-op thread, each op inside
    single-threaded. The CPU store's ops are small (one block each): split by torch across cores, every op moves
    the block between the cores' caches and pays a fork-join, while one thread per part keeps its block in one
    core's cache (with the 16-bit output of `_map_store_cpu`, the store at 4096 tokens went from 1.37-2.12x flash
    attention to 0.97-1.35x on the development Xeon, docs/BENCHMARKS.md runs 4-10). torch's thread count is set
    to 1 while the parts run and restored after, so other threads that start torch work during a store run
    single-threaded."""
    total = torch.get_num_threads()
    threads = min(total, count)
    if threads < 2:
        work(range(count))
        return
    key = (os.getpid(), threads)
    pool = _POOL.get(key) or _POOL.setdefault(key, ThreadPoolExecutor(threads, "attnreuse-store"))
    bounds = [count * t // threads for t in range(threads + 1)]
    torch.set_num_threads(1)
    try:
        list(pool.map(work, [range(a, b) for a, b in zip(bounds, bounds[1:])]))
    finally:
        torch.set_num_threads(total)


def _map_store_cpu(query, key, value, scale: float, attn_map: torch.Tensor, fp8_scale: float | None = None):
    """A V and A on a CPU, A written into `attn_map` (batch*heads, queries, keys), fp32 inputs, no mask. Blocks of
    query rows per head, one thread per core (`_on_cores`): a block's scores are normalised while they are in
    cache, and the map is written to memory once and not read back. An fp32 map is written in place and the
    output is the fp32 A V, as at a plain call. A 16-bit map gets a rounded copy of the block, and the output is
    that rounded block times V rounded alike: the product a reuse of the map computes (`_times_map`), on the
    CPU's 16-bit matrix units (`_output_via_map`). An fp8 map (times `fp8_scale`) has no matmul: its output is
    the fp32 A V. The one-shot path (scores, softmax, A V) passes over the whole map four times: 3.1-4.3x flash
    attention at 4096 tokens on the development Xeon (`ReuseState.buffer` keeps the map's memory between
    stores)."""
    q, k, v = _flat(query * scale), _flat(key), _flat(value)  # Q scaled once: no pass over each block to scale
    out = torch.empty_like(q)
    rows = max(1, _BLOCK // k.shape[1])
    same = attn_map.dtype == q.dtype
    via_map = _output_via_map(attn_map.dtype, q.dtype)
    v_map = v.to(attn_map.dtype) if via_map else None
    starts = range(0, q.shape[1], rows)

    def part(items):
        scratch = None if same else q.new_empty(rows, k.shape[1])
        for item in items:
            i, r = divmod(item, len(starts))
            r = starts[r]
            kept = attn_map[i, r:r + rows]
            block = kept if same else scratch[:kept.shape[0]]
            torch.mm(q[i, r:r + rows], k[i].t(), out=block)
            torch.ops.aten._softmax.out(block, -1, False, out=block)
            if via_map:
                kept.copy_(block)
                out[i, r:r + rows] = torch.mm(kept, v_map[i])
            else:
                torch.mm(block, v[i], out=out[i, r:r + rows])
                if not same:
                    kept.copy_(block if fp8_scale is None else block.mul_(fp8_scale))
    _on_cores(part, q.shape[0] * len(starts))
    return out


def _output_via_map(map_dtype, dtype) -> bool:
    """Whether a store's output is its kept map times V, as a reuse computes it (`_times_map`): for a 16-bit map
    in another dtype than the model's (the fused CUDA kernel never serves those). Then every call of a layer that
    keeps a map applies the map as kept, and the CPU store runs its A V on the 16-bit matrix units. fp8 has no
    matmul, so its store's output is the unrounded A V."""
    return map_dtype in (torch.float16, torch.bfloat16) and map_dtype != dtype


def _times_map(attn_map: torch.Tensor, value: torch.Tensor, unscale) -> torch.Tensor:
    """A V (batch*heads, queries, dim) with A as kept. A 16-bit map multiplies V rounded to its dtype, so A is
    read once and never copied: on the development Xeon (AMX) a bf16 map's A V is 2.5-4.6x faster than fp32 at 4096
    tokens (docs/BENCHMARKS.md), and an fp16 map no longer pays for an fp32 copy of A. fp8 has no matmul: the map
    is dequantised (the CUDA kernel avoids that copy, see `check_kernels`)."""
    if unscale is not None:
        return torch.bmm(attn_map.to(value.dtype), value) * unscale
    return torch.bmm(attn_map, value.to(attn_map.dtype)).to(value.dtype)


def _unscale(dtype) -> float | None:
    """The factor that undoes the scale of a map kept in `dtype` (None unless fp8)."""
    scale = _FP8_SCALE.get(dtype)
    return None if scale is None else 1.0 / scale


def _pack(attn_map: torch.Tensor, dtype) -> tuple:
    """The map in the cache's dtype, and the factor that undoes an fp8 scale (None otherwise)."""
    if dtype is None or dtype == attn_map.dtype:
        return attn_map, None
    scale = _FP8_SCALE.get(dtype)
    return (attn_map if scale is None else attn_map * scale).to(dtype), _unscale(dtype)


_KERNEL_OK: dict[tuple, bool] = {}  # (kernel, device type, dtype, head dim, map dtype) -> passed its check
USE_KERNELS = True  # the benchmark turns the Triton kernels off to measure the plain torch path beside them


def check_kernels(device: torch.device, dtype: torch.dtype, head_dims, map_dtype=None) -> dict:
    """Run the Triton store and reuse kernels once per head dim against plain torch, at apply time (eagerly,
    outside any compiled graph). Only what passes is used, so a kernel that cannot build or disagrees on some GPU
    falls back to plain torch instead of making wrong images."""
    map_dtype = map_dtype or dtype
    # the reuse kernel only for fp8 maps: for fp16 maps cuBLAS's batched matmul was faster on an H100
    # (0.298 against 0.349 ms, docs/BENCHMARKS.md), while for fp8 it saves torch's dequantised copy of A
    kernels = ("store", "reuse") if map_dtype in _FP8_SCALE else ("store",)
    for dim in sorted(set(head_dims)):
        for kernel in kernels:
            key = (kernel, device.type, dtype, dim, map_dtype)
            if key not in _KERNEL_OK:
                _KERNEL_OK[key] = _check_kernel(kernel, device, dtype, dim, map_dtype)
    return _KERNEL_OK


def _check_kernel(kernel: str, device, dtype, dim: int, map_dtype) -> bool:
    fp8 = map_dtype in _FP8_SCALE
    if (device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or dim > 128
            or not (map_dtype == dtype or map_dtype == getattr(torch, "float8_e4m3fn", None))
            or (fp8 and torch.cuda.get_device_capability(device) < (8, 9))):
        return False
    try:
        from . import kernels

        q, k, v = torch.randn(3, 2, 3, 300, dim, device=device, dtype=dtype)
        ref = torch.softmax(q.float() @ k.float().transpose(-1, -2) * dim ** -0.5, -1)
        unscale = 1 / kernels.FP8_SCALE if fp8 else 1.0
        if kernel == "store":
            out, attn_map = kernels.attention_with_map(q, k, v, dim ** -0.5, fp8)
            error = (attn_map.float().view_as(ref) * unscale - ref).abs().max().item()
            error = max(error / (8 if fp8 else 1), (out.float().transpose(1, 2) - ref @ v.float()).abs().max().item())
        else:
            packed = (ref / unscale).to(map_dtype).view(-1, 300, 300)
            out = kernels.apply_map(packed, v, unscale)
            error = (out.float().transpose(1, 2) - (packed.float() * unscale).view_as(ref) @ v.float()).abs().max()
            error = error.item()
        if error < 2e-2:
            return True
        logger.warning("attnreuse: the Triton %s kernel is off by %.3g (head dim %d); plain torch instead", kernel,
                       error, dim)
    except Exception as err:  # no Triton, or it cannot build here: plain torch serves
        logger.info("attnreuse: Triton %s kernel unavailable for head dim %d (%s); plain torch", kernel, dim, err)
    return False


def _kernel_ok(kernel: str, tensor, dim: int, map_dtype) -> bool:
    return USE_KERNELS and _KERNEL_OK.get((kernel, tensor.device.type, tensor.dtype, dim, map_dtype), False)


class ReuseAttnProcessor:
    """Attention with a cache slot per layer, driven by the shared `ReuseState` (see the module docstring)."""

    def __init__(self, name: str, original, state: ReuseState, mode: str = MAP, cross: bool = False):
        self.name = name
        self.original = original
        self.state = state
        self.mode = OUTPUT if mode == OUTPUT else CROSS if cross else mode
        # follow the conventions of the processor being replaced: diffusers' SDPA processors scale by
        # 1/sqrt(head_dim) whatever attn.scale says, and only AttnProcessor2_0 applies the QK norms
        self._scale_default = isinstance(original, _DEFAULT_SCALE)
        self._qk_norm = isinstance(original, ap.AttnProcessor2_0)
        params = inspect.signature(original.__call__).parameters
        self._original_kwargs = {k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        state = self.state
        action = state.action
        slot = state.get(self.name) if action == REUSE else None
        if action == COMPUTE or (slot is not None and slot[0] == NONE):
            extra = {k: v for k, v in dict(kwargs, temb=temb).items() if k in self._original_kwargs and v is not None}
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **extra)
        x, residual, shape = _enter(attn, hidden_states, temb)
        context = _context(attn, x, encoder_hidden_states)
        if action == STORE:
            out = self._store(attn, x, context, attention_mask)
        else:
            out = self._reuse(attn, x, context, attention_mask, slot)
        return _exit(attn, out, residual, shape)

    # -- pieces ---------------------------------------------------------------------------------
    def _qkv(self, attn, x, context):
        norm_q, norm_k = (attn.norm_q, attn.norm_k) if self._qk_norm else (None, None)
        query = _split(attn, attn.to_q(x), norm_q)
        key = _split(attn, attn.to_k(context), norm_k)
        value = _split(attn, attn.to_v(context))
        scale = query.shape[-1] ** -0.5 if self._scale_default else attn.scale
        return query, key, value, scale

    @staticmethod
    def _mask(attn, mask, keys: int, batch: int, heads: bool):
        """The layer's mask for SDPA (batch, heads, queries, keys) or for the explicit map (batch*heads, ., keys)."""
        if mask is None:
            return None
        mask = attn.prepare_attention_mask(mask, keys, batch)
        return mask.view(batch, attn.heads, -1, mask.shape[-1]) if heads else mask

    def _sdpa(self, attn, query, key, value, mask, scale):
        mask = self._mask(attn, mask, key.shape[2], query.shape[0], heads=True)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)

    def _kind(self, attn, query, key) -> str:
        """What this layer keeps: its mode (auto resolved by map size), or, under `max_cache_bytes`, a cheaper
        fallback when it would not fit beside what the other layers reserved (`ReuseState.reservation`). Fixed by
        shapes alone, so every generation of a size chooses the same."""
        kind = self.mode
        if kind == AUTO:
            limit = AUTO_MAP_MAX_PAIRS.get(query.device.type, AUTO_MAP_MAX_PAIRS["cpu"])
            kind = MAP if query.shape[2] * key.shape[2] <= limit else QK
        budget = self.state.max_cache_bytes
        if budget is None:
            return kind
        shapes = (tuple(query.shape), tuple(key.shape), query.dtype)
        chosen = self.state.reservation(self.name, shapes)
        if chosen is not None:
            return chosen
        held = self.state.reserved_bytes
        while kind != NONE and held + self._predicted(kind, attn, query, key) > budget:
            kind = _FALLBACK[kind]
        self.state.reserve(self.name, shapes, kind, self._predicted(kind, attn, query, key))
        return kind

    def _predicted(self, kind, attn, query, key) -> int:
        b, h, q, d = query.shape
        dtype = self.state.cache_dtype or query.dtype
        size = {MAP: b * h * q * key.shape[2] * dtype.itemsize,
                QK: slot_bytes((QK, query, key)), OUTPUT: b * q * attn.to_out[0].out_features * query.element_size(),
                NONE: 0}
        return size[kind] if kind != CROSS else size[QK] + size[OUTPUT]

    def _store(self, attn, x, context, mask):
        state = self.state  # `before_call` emptied the cache
        query, key, value, scale = self._qkv(attn, x, context)
        kind = self._kind(attn, query, key)
        if kind == MAP:
            out, attn_map, unscale = self._map_store(attn, query, key, value, mask, scale)
            slot = (MAP, attn_map, unscale)
            out = attn.to_out[1](attn.to_out[0](out))
        else:
            out = _merge(attn, self._sdpa(attn, query, key, value, mask, scale))
            slot = {QK: (QK, query, key), OUTPUT: (OUTPUT, out), CROSS: (CROSS, out, query, key), NONE: (NONE,)}[kind]
        state.slots[self.name] = slot
        return out

    def _map_store(self, attn, query, key, value, mask, scale):
        """(out (batch, queries, heads*dim), A (batch*heads, queries, keys) in the cache's dtype, the factor that
        undoes an fp8 scale or None)."""
        b, h, q, d = query.shape
        map_dtype = self.state.cache_dtype or query.dtype
        if (mask is None and not (attn.upcast_attention or attn.upcast_softmax)
                and _kernel_ok("store", query, d, map_dtype)):
            out, attn_map = torch.ops.attnreuse.attention_with_map(query, key, value, scale, map_dtype in _FP8_SCALE)
            return out.view(b, q, h * d), attn_map, _unscale(map_dtype)
        if (query.device.type == "cpu" and mask is None and query.dtype == torch.float32
                and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and query.requires_grad)):
            attn_map = self.state.buffer(self.name, (b * h, q, key.shape[2]), map_dtype, query.device)
            out = _map_store_cpu(query, key, value, scale, attn_map, _FP8_SCALE.get(map_dtype))
            unscale = _unscale(map_dtype)
        else:
            mask = self._mask(attn, mask, key.shape[2], b, heads=False)
            out = _attention_map(attn, _flat(query), _flat(key), mask, scale)
            attn_map, unscale = _pack(out, self.state.cache_dtype)
            out = (_times_map(attn_map, _flat(value), unscale) if _output_via_map(attn_map.dtype, out.dtype)
                   else torch.bmm(out, _flat(value)))
        return out.view(b, h, q, d).transpose(1, 2).reshape(b, q, h * d), attn_map, unscale

    def _reuse(self, attn, x, context, mask, slot):
        kind = slot[0]
        if kind == OUTPUT or (kind == CROSS and not self.state.context_changed):
            return slot[1]
        value = _split(attn, attn.to_v(context))
        if kind == MAP:
            attn_map, unscale = slot[1], slot[2]
            self._check(attn_map, value, x)
            b, h, k, d = value.shape
            if _kernel_ok("reuse", value, d, attn_map.dtype):
                out = torch.ops.attnreuse.apply_map(attn_map, value, 1.0 if unscale is None else unscale)
                return attn.to_out[1](attn.to_out[0](out.view(b, -1, h * d)))
            return _merge(attn, _times_map(attn_map, _flat(value), unscale).view(b, h, -1, d))
        query, key = slot[-2], slot[-1]  # qk, or cross-attention with a changed text
        scale = query.shape[-1] ** -0.5 if self._scale_default else attn.scale
        return _merge(attn, self._sdpa(attn, query, key, value, mask, scale))

    def _check(self, attn_map, value, x):
        b, h, k, _ = value.shape
        if attn_map.shape != (b * h, x.shape[1], k):
            raise RuntimeError(
                f"attnreuse: layer {self.name!r} cached a map of shape {tuple(attn_map.shape)} (batch*heads, queries, "
                f"keys) but call {self.state.call} has batch*heads={b * h}, queries={x.shape[1]}, keys={k}. The batch "
                "or resolution changed within one generation (e.g. CFG run as separate calls); reset the handle "
                "between such calls."
            )
