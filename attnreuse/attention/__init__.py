"""Attention for reuse: the math of a diffusers attention layer (`math`), the processor that computes, stores or
reuses (`processor`), the CPU blockwise store (`cpu_store`) and the Triton kernels with their check."""

from .kernel_check import check_kernels
from .processor import SUPPORTED_PROCESSORS, Conventions, ReuseAttnProcessor

__all__ = ["ReuseAttnProcessor", "SUPPORTED_PROCESSORS", "Conventions", "check_kernels"]
