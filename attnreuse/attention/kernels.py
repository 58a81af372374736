"""Triton kernels for the store and reuse calls of map mode.

Store: attention output and the normalised map A in one launch.

Flash attention never materialises A, and the explicit path (Q K^T, softmax, A V) reads and writes the map four
times. This kernel makes two passes over the keys per block of queries: the first finds each row's max and sum
(online softmax, as flash attention does), the second recomputes Q K^T, writes A once in the cache's dtype and
accumulates A V from the same rounded A that a reuse call will read (fp8 maps are written as A * 448 in one go).
Reuse: A V reading each map once, fp16 or fp8 (converted in registers, never a second copy of A), written
straight into the (batch, queries, heads, dim) layout that `to_out` takes.
Imported only where Triton is installed; `kernel_check` checks each kernel once per shape family when reuse is
applied and falls back to plain torch everywhere else. `TRITON_INTERPRET=1` runs them on CPU tensors for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .math import FP8_SCALE as _SCALES

__all__ = ["attention_with_map", "apply_map", "FP8_SCALE"]

FP8_SCALE = _SCALES[torch.float8_e4m3fn]  # fp8 maps hold A * 448, as `math.FP8_SCALE` says why


@triton.jit
def _tile(heads, n_q, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch * head), batch, head, query rows, dims and key columns, with their bounds."""
    block, bh = tl.program_id(0), tl.program_id(1)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    return bh, bh // heads, bh % heads, rows, dims, tl.arange(0, BLOCK_N), rows < n_q, dims < DIM


@triton.jit
def _attention_with_map(Q, K, V, A, O, sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                        sob, soh, sot, sod, heads, n_q, n_k, qk_scale, map_scale,
                        DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, b, h, rows, dims, cols, row_ok, dim_ok = _tile(heads, n_q, DIM, BLOCK_M, BLOCK_N, BLOCK_D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :] * sqd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_sum = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, n_k, BLOCK_N):  # pass 1: row max and sum of exp (base 2)
        keys = start + cols
        k = tl.load(k_base + keys[None, :] * skt + dims[:, None] * skd,
                    mask=(keys[None, :] < n_k) & dim_ok[:, None], other=0.0)
        s = tl.dot(q, k) * qk_scale
        s = tl.where(keys[None, :] < n_k, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        s_sum = s_sum * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m = m_new
    inv = 1.0 / s_sum
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    a_base = A + bh.to(tl.int64) * n_q * n_k
    for start in range(0, n_k, BLOCK_N):  # pass 2: write A once, accumulate A V
        keys = start + cols
        key_ok = keys < n_k
        k = tl.load(k_base + keys[None, :] * skt + dims[:, None] * skd,
                    mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
        p = tl.exp2(tl.dot(q, k) * qk_scale - m[:, None]) * inv[:, None]
        p = tl.where(key_ok[None, :], p, 0.0)
        tl.store(a_base + rows[:, None].to(tl.int64) * n_k + keys[None, :], (p * map_scale).to(A.dtype.element_ty),
                 mask=row_ok[:, None] & key_ok[None, :])
        v = tl.load(v_base + keys[:, None] * svt + dims[None, :] * svd,
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        acc += tl.dot(p.to(v.dtype), v)
    tl.store(O + b * sob + h * soh + rows[:, None] * sot + dims[None, :] * sod, acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _apply_map(A, V, O, svb, svh, svt, svd, sob, soh, sot, sod, heads, n_q, n_k, unscale,
               DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, b, h, rows, dims, cols, row_ok, dim_ok = _tile(heads, n_q, DIM, BLOCK_M, BLOCK_N, BLOCK_D)
    a_base, v_base = A + bh.to(tl.int64) * n_q * n_k, V + b * svb + h * svh
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n_k, BLOCK_N):
        keys = start + cols
        key_ok = keys < n_k
        a = tl.load(a_base + rows[:, None].to(tl.int64) * n_k + keys[None, :], mask=row_ok[:, None] & key_ok[None, :],
                    other=0.0)
        v = tl.load(v_base + keys[:, None] * svt + dims[None, :] * svd, mask=key_ok[:, None] & dim_ok[None, :],
                    other=0.0)
        acc += tl.dot(a.to(v.dtype), v)
    tl.store(O + b * sob + h * soh + rows[:, None] * sot + dims[None, :] * sod, (acc * unscale).to(O.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def _blocks(dim: int) -> tuple[int, int, int, int]:
    block_d = max(16, triton.next_power_of_2(dim))
    block_m, block_n = (128, 64) if block_d <= 64 else (64, 64)
    return block_m, block_n, block_d, 8 if block_m == 128 else 4


@torch.library.custom_op("attnreuse::apply_map", mutates_args=())
def apply_map(attn_map: torch.Tensor, value: torch.Tensor, unscale: float) -> torch.Tensor:
    """A (batch * heads, queries, keys), fp16/bf16/fp32 or fp8, times value (batch, heads, keys, dim), any
    strides, times `unscale`: out (batch, queries, heads, dim) in value's dtype."""
    b, h, n_k, dim = value.shape
    n_q = attn_map.shape[1]
    out = torch.empty(b, n_q, h, dim, dtype=value.dtype, device=value.device)
    block_m, block_n, block_d, warps = _blocks(dim)
    _apply_map[(triton.cdiv(n_q, block_m), b * h)](
        attn_map, value, out, *value.stride(), out.stride(0), out.stride(2), out.stride(1), out.stride(3), h, n_q,
        n_k, unscale, DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=3)
    return out


@apply_map.register_fake
def _(attn_map, value, unscale):
    b, h, n_k, dim = value.shape
    return value.new_empty(b, attn_map.shape[1], h, dim)


@torch.library.custom_op("attnreuse::attention_with_map", mutates_args=())
def attention_with_map(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                       fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """query (batch, heads, queries, dim), key/value (batch, heads, keys, dim), any strides.

    Returns out (batch, queries, heads, dim), i.e. heads already merged by a free view, and
    A = softmax(Q K^T * scale) as (batch * heads, queries, keys) in the inputs' dtype, or with `fp8` as
    float8_e4m3fn holding A * FP8_SCALE. A torch custom op, so that `torch.compile` keeps it in the graph instead of
    breaking the graph at every store."""
    b, h, n_q, dim = query.shape
    n_k = key.shape[2]
    attn_map = torch.empty(b * h, n_q, n_k, dtype=torch.float8_e4m3fn if fp8 else query.dtype, device=query.device)
    out = torch.empty(b, n_q, h, dim, dtype=query.dtype, device=query.device)
    block_m, block_n, block_d, warps = _blocks(dim)
    _attention_with_map[(triton.cdiv(n_q, block_m), b * h)](
        query, key, value, attn_map, out, *query.stride(), *key.stride(), *value.stride(),
        out.stride(0), out.stride(2), out.stride(1), out.stride(3), h, n_q, n_k, scale * 1.4426950408889634,
        FP8_SCALE if fp8 else 1.0, DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
        num_stages=2)
    return out, attn_map


@attention_with_map.register_fake
def _(query, key, value, scale, fp8=False):
    b, h, n_q, dim = query.shape
    return (query.new_empty(b, n_q, h, dim),
            query.new_empty(b * h, n_q, key.shape[2], dtype=torch.float8_e4m3fn if fp8 else query.dtype))
