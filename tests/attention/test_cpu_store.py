"""The CPU blockwise store: the one-shot map and output, block by block, one worker thread per core."""


import pytest
import torch
from helpers import MAP_DTYPES, assert_rounded, packed

from attnreuse.attention.cpu_store import CoreThreads, map_store_cpu
from attnreuse.attention.math import FP8_SCALE, times_map


@pytest.mark.parametrize("dtype", MAP_DTYPES, ids=str)
def test_cpu_blockwise_store_is_the_one_shot_map_and_output(dtype):
    """The CPU store writes A block by block into the map, over the cores in parts; with blocks that do not divide
    the queries it still gives the one-shot softmax(Q K^T * scale), rounded to the map's dtype. Its output is the
    A V of the unrounded A for fp32 and fp8 maps, and for 16-bit maps what a reuse of the kept map computes."""
    torch.manual_seed(0)
    q = torch.randn(2, 37, 3, 8).transpose(1, 2)  # (batch, heads, queries, dim), strided as the processor has it
    k, v = torch.randn(2, 3, 41, 8), torch.randn(2, 3, 41, 8)
    attn_map = torch.full((6, 37, 41), float("nan")).to(dtype)
    threads = CoreThreads()
    out = map_store_cpu(q, k, v, 0.3, attn_map, FP8_SCALE.get(dtype), threads, block=5 * 41)  # 37 = 7 x 5 + 2 rows
    threads.shutdown()
    reference = torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1)
    expected = packed(reference.reshape(6, 37, 41), dtype)
    assert_rounded(attn_map, expected)
    if dtype in (torch.bfloat16, torch.float16):
        reuse = times_map(attn_map, v.reshape(6, 41, 8), None)
        torch.testing.assert_close(out, reuse, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).tiny)
        reference = (attn_map.double() @ v.reshape(6, 41, 8).to(dtype).double()).view(2, 3, 37, 8)  # rounded once
        tolerance = dict(rtol=torch.finfo(dtype).eps, atol=1e-3)
    else:
        tolerance = dict(rtol=1e-5, atol=1e-6)
        reference = reference @ v
    torch.testing.assert_close(out.view(2, 3, 37, 8), reference.float(), **tolerance)
