"""Whether the Triton store and reuse kernels (`kernels.py`) may serve a layer on this device.

Each kernel runs once per (device, dtype, head dim, map dtype) against plain torch, when reuse is applied (eagerly,
outside any compiled graph). Only what passes is used, so a kernel that cannot build or disagrees on some GPU
falls back to plain torch instead of making wrong images.
"""

from __future__ import annotations

import logging

import torch

from .math import FP8_SCALE, unscale

logger = logging.getLogger(__name__)

__all__ = ["check_kernels", "kernel_ok"]

_PASSED: dict[tuple, bool] = {}  # what the checks found, per process: facts about the device, never switched


def check_kernels(device: torch.device, dtype: torch.dtype, head_dims, map_dtype=None) -> dict:
    """Check the kernels a map of `map_dtype` would use, once per head dim; returns every result so far."""
    map_dtype = map_dtype or dtype
    # the reuse kernel only for fp8 maps: cuBLAS's batched matmul reads a 16-bit map faster (docs/BENCHMARKS.md,
    # "Kernels"), while for fp8 it saves torch's dequantised copy of A
    kernels = ("store", "reuse") if map_dtype in FP8_SCALE else ("store",)
    for dim in sorted(set(head_dims)):
        for kernel in kernels:
            key = (kernel, device.type, dtype, dim, map_dtype)
            if key not in _PASSED:
                _PASSED[key] = _check(kernel, device, dtype, dim, map_dtype)
    return dict(_PASSED)


def kernel_ok(kernel: str, tensor: torch.Tensor, dim: int, map_dtype) -> bool:
    """Whether `kernel` passed its check for tensors like `tensor` with this head dim and map dtype."""
    return _PASSED.get((kernel, tensor.device.type, tensor.dtype, dim, map_dtype), False)


def _eligible(device, dtype, dim: int, map_dtype) -> bool:
    fp8 = map_dtype in FP8_SCALE
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and dim <= 128
            and (map_dtype == dtype or map_dtype == getattr(torch, "float8_e4m3fn", None))
            and not (fp8 and torch.cuda.get_device_capability(device) < (8, 9)))


def _error(kernel: str, device, dtype, dim: int, map_dtype) -> float:
    """The largest difference of the kernel's results to plain torch on random inputs."""
    from . import kernels

    fp8 = map_dtype in FP8_SCALE
    q, k, v = torch.randn(3, 2, 3, 300, dim, device=device, dtype=dtype)
    ref = torch.softmax(q.float() @ k.float().transpose(-1, -2) * dim ** -0.5, -1)
    factor = unscale(map_dtype) or 1.0
    if kernel == "store":
        out, attn_map = kernels.attention_with_map(q, k, v, dim ** -0.5, fp8)
        error = (attn_map.float().view_as(ref) * factor - ref).abs().max().item()
        return max(error / (8 if fp8 else 1), (out.float().transpose(1, 2) - ref @ v.float()).abs().max().item())
    packed = (ref / factor).to(map_dtype).view(-1, 300, 300)
    out = kernels.apply_map(packed, v, factor)
    return (out.float().transpose(1, 2) - (packed.float() * factor).view_as(ref) @ v.float()).abs().max().item()


def _check(kernel: str, device, dtype, dim: int, map_dtype) -> bool:
    if not _eligible(device, dtype, dim, map_dtype):
        return False
    try:
        error = _error(kernel, device, dtype, dim, map_dtype)
    except Exception as err:  # noqa: BLE001 - no Triton, or it cannot build here: plain torch serves
        logger.info("attnreuse: Triton %s kernel unavailable for head dim %d (%s); plain torch", kernel, dim, err)
        return False
    if error < 2e-2:
        return True
    logger.warning("attnreuse: the Triton %s kernel is off by %.3g (head dim %d); plain torch instead", kernel,
                   error, dim)
    return False
