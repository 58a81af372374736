"""Timing attention alone: one self-attention layer's core in each implementation, and the share of a call that
attention modules take (the most any reuse call can skip)."""

from __future__ import annotations

import statistics
import time

import torch

from ..attention import check_kernels
from ..attention.cpu_store import CoreThreads, map_store_cpu
from ..attention.kernel_check import kernel_ok
from ..attention.math import FP8_SCALE, flat, times_map
from ..layers import attention_layers
from ..pipelines.timing import timed
from .calls import fp8_ok

__all__ = ["attention_only", "attention_profile"]


def _cpu_cases(q, k, v, attn_map, scale, threads: CoreThreads) -> dict:
    """The blockwise CPU stores (into new and kept memory, fp32 and bf16 maps) and a bf16 map's reuse."""
    kept, kept16 = torch.empty_like(attn_map), torch.empty_like(attn_map, dtype=torch.bfloat16)
    bf16 = attn_map.to(torch.bfloat16)  # the CPU's 16-bit map: its matmul has AMX units on recent Xeons
    return {"store blockwise new": lambda: map_store_cpu(q, k, v, scale, torch.empty_like(attn_map), None, threads),
            "store blockwise kept": lambda: map_store_cpu(q, k, v, scale, kept, None, threads),
            "store blockwise bf16 kept": lambda: map_store_cpu(q, k, v, scale, kept16, None, threads),
            "reuse bf16": lambda: times_map(bf16, flat(v), None)}


def _kernel_cases(q, k, v, attn_map, fp8, scale, device, dtype, dim) -> dict:
    """The Triton store and reuse kernels that pass their check here, for the model's dtype and fp8 maps."""
    cases = {}
    fp8_dtype = getattr(torch, "float8_e4m3fn", None)
    for map_dtype, packed in ((dtype, attn_map), (fp8_dtype, fp8)):
        if packed is None:
            continue
        check_kernels(device, dtype, [dim], map_dtype)
        tag = "fp8 " if map_dtype == fp8_dtype else ""
        if kernel_ok("store", q, dim, map_dtype):
            cases[f"store {tag}kernel"] = lambda f=bool(tag): torch.ops.attnreuse.attention_with_map(q, k, v, scale, f)
        if kernel_ok("reuse", v, dim, map_dtype):
            cases[f"reuse {tag}kernel"] = lambda m=packed: torch.ops.attnreuse.apply_map(m, v, 1.0)
    return cases


def attention_only(batch: int, heads: int, tokens: int, dim: int, device, dtype, repeats: int = 20) -> dict:
    """One self-attention layer's core, projections left out: flash (SDPA) against a store (explicit softmax then
    A V; the blockwise CPU store or the fused kernel where they run) and a reuse (A V from a kept map: the model's
    dtype, fp8, and bf16 on a CPU), each as a ratio to flash."""
    device = torch.device(device)
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(batch, tokens, heads, dim, generator=g, device=device, dtype=dtype).transpose(1, 2)
               for _ in range(3))
    scale = dim ** -0.5
    attn_map = torch.softmax(flat(q) @ flat(k).transpose(1, 2) * scale, -1)
    fp8_dtype = getattr(torch, "float8_e4m3fn", None)
    fp8 = (attn_map * FP8_SCALE[fp8_dtype]).to(fp8_dtype) if fp8_ok(device) else None
    cases = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale),
             "store torch": lambda: torch.bmm(torch.softmax(torch.baddbmm(
                 torch.empty(1, 1, 1, device=device, dtype=dtype), flat(q), flat(k).transpose(1, 2), beta=0,
                 alpha=scale), -1), flat(v)),
             "reuse torch": lambda: torch.bmm(attn_map, flat(v))}
    threads = CoreThreads()
    if device.type == "cpu" and dtype == torch.float32:
        cases.update(_cpu_cases(q, k, v, attn_map, scale, threads))
    if fp8 is not None:
        cases["reuse fp8 torch"] = lambda: times_map(fp8, flat(v), 1 / FP8_SCALE[fp8_dtype])
    cases.update(_kernel_cases(q, k, v, attn_map, fp8, scale, device, dtype, dim))
    result = {}
    with torch.no_grad():
        for name, fn in cases.items():
            fn()
            result[name] = statistics.median(timed(fn, device)[1] * 1000 for _ in range(repeats))
    threads.shutdown()
    base = result["sdpa"]
    return {"shape": [batch, heads, tokens, dim], "map_mib": attn_map.numel() * attn_map.element_size() / 2**20,
            **{name: {"ms": ms, "x": ms / base} for name, ms in result.items()}}


def _timing_hooks(model, kinds, device, shapes, spent) -> list:
    """Hooks on every attention module that add its time to `spent[kind]` and note self-attention shapes."""
    clock = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)

    def before(name):
        def hook(mod, args, kwargs):
            if kinds[name] == "self":
                text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                tokens = (args[0] if args else kwargs["hidden_states"]).shape[1]
                tokens += 0 if text is None else text.shape[1]  # joint attention (SD3, Flux) over both streams
                shapes.append((mod.heads, tokens, mod.inner_dim // mod.heads))
            sync()
            clock[name] = time.perf_counter()
        return hook

    def after(name):
        def hook(mod, args, kwargs, output):
            sync()
            spent[kinds[name]] += time.perf_counter() - clock[name]
        return hook

    modules = {name: model.get_submodule(name) for name in kinds}
    return [h for name, m in modules.items() for h in (m.register_forward_pre_hook(before(name), with_kwargs=True),
                                                      m.register_forward_hook(after(name), with_kwargs=True))]


def attention_profile(model, inputs, device, calls: int = 3) -> tuple[tuple[int, int, int], dict, int]:
    """From plain calls with hooks on every attention module: (heads, tokens, head dim) of the self-attention layer
    with the most tokens, the median share of a call spent in self- and cross-attention modules, and the number
    of entries of all self-attention maps of one call (batch included)."""
    kinds, device = attention_layers(model), torch.device(device)
    shapes, spent, shares = [], {"self": 0.0, "cross": 0.0}, {"self": [], "cross": []}
    hooks = _timing_hooks(model, kinds, device, shapes, spent)
    sample = inputs.get("sample", inputs.get("hidden_states"))
    inputs = {"timestep": torch.tensor(500.0, device=sample.device), **inputs}  # a transformer's own timestep wins
    try:
        with torch.no_grad():
            for _ in range(calls):
                spent.update(self=0.0, cross=0.0)
                total = timed(lambda: model(**inputs), device)[1]
                for kind, seconds in spent.items():
                    shares[kind].append(seconds / total)
    finally:
        for h in hooks:
            h.remove()
    pairs = sample.shape[0] * sum(h * t * t for h, t, _ in shapes) // calls
    return max(shapes, key=lambda s: s[1]), {kind: statistics.median(v) for kind, v in shares.items()}, pairs
