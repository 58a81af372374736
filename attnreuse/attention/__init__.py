"""Attention for reuse: the math of a diffusers attention layer (`math`), one adapter per processor family
(`families`), the processor that computes, stores or reuses (`processor`), the CPU blockwise store (`cpu_store`) and
the Triton kernels with their check."""

from .families import family_of
from .kernel_check import check_kernels
from .processor import SUPPORTED_PROCESSORS, ReuseAttnProcessor

__all__ = ["ReuseAttnProcessor", "SUPPORTED_PROCESSORS", "family_of", "check_kernels"]
