"""A CPU store call in blocks of query rows: the map is written to memory once and never read back.

The one-shot path (scores, softmax, A V) passes over the whole map four times; here each block's scores are
normalised while they sit in one core's cache. Blocks run one thread per core with torch single-threaded inside
each worker, so no op moves a block between cores (docs/BENCHMARKS.md, "CPU store").
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .math import flat, output_via_map

__all__ = ["BLOCK", "CoreThreads", "map_store_cpu"]

BLOCK = 1 << 20  # scores in one block (4 MiB of fp32): small enough to stay in a core's cache


def _one_thread() -> None:
    torch.set_num_threads(1)  # per worker thread: the caller's thread count is left alone


class CoreThreads:
    """One worker thread per torch intra-op thread, made on first use and again in a forked child (which has
    none of its parent's threads); `shutdown()` lets them go."""

    def __init__(self):
        self._pool, self._key = None, None

    def run(self, work, count: int) -> None:
        """`work(items)` over `range(count)`, split into one contiguous part per thread."""
        threads = min(torch.get_num_threads(), count)
        if threads < 2:
            work(range(count))
            return
        key = (os.getpid(), threads)
        if self._key != key:
            self._pool, self._key = ThreadPoolExecutor(threads, "attnreuse-store", initializer=_one_thread), key
        bounds = [count * t // threads for t in range(threads + 1)]
        list(self._pool.map(work, [range(a, b) for a, b in zip(bounds, bounds[1:])]))

    def shutdown(self) -> None:
        if self._pool is not None and self._key[0] == os.getpid():
            self._pool.shutdown(wait=False)
        self._pool, self._key = None, None


def map_store_cpu(query, key, value, scale: float, attn_map: torch.Tensor, fp8_scale: float | None = None,
                  threads: CoreThreads | None = None, block: int = BLOCK) -> torch.Tensor:
    """A V (batch*heads, queries, dim) and A written into `attn_map` (batch*heads, queries, keys), fp32 inputs
    (batch, heads, tokens, dim), no mask. An fp32 map is written in place and the output is the fp32 A V. A 16-bit
    map gets a rounded copy of each block, and the output is that rounded block times V rounded alike, as a reuse
    computes it. An fp8 map holds A * `fp8_scale`; its output is the fp32 A V. Without `threads` the blocks run in
    the calling thread."""
    q, k, v = flat(query * scale), flat(key), flat(value)  # Q scaled once, not once per block
    out = torch.empty_like(q)
    rows = max(1, block // k.shape[1])
    same = attn_map.dtype == q.dtype
    via_map = output_via_map(attn_map.dtype, q.dtype)
    v_map = v.to(attn_map.dtype) if via_map else None
    starts = range(0, q.shape[1], rows)

    def part(items):
        scratch = None if same else q.new_empty(rows, k.shape[1])
        for item in items:
            i, r = divmod(item, len(starts))
            r = starts[r]
            kept = attn_map[i, r:r + rows]
            scores = kept if same else scratch[:kept.shape[0]]
            torch.mm(q[i, r:r + rows], k[i].t(), out=scores)
            torch.ops.aten._softmax.out(scores, -1, False, out=scores)
            if via_map:
                kept.copy_(scores)
                out[i, r:r + rows] = torch.mm(kept, v_map[i])
            else:
                torch.mm(scores, v[i], out=out[i, r:r + rows])
                if not same:
                    kept.copy_(scores if fp8_scale is None else scores.mul_(fp8_scale))

    count = q.shape[0] * len(starts)
    if threads is None:
        part(range(count))
    else:
        threads.run(part, count)
    return out
