"""Timing a call and naming the device it ran on: every figure the tools print is timed and labelled here."""

from __future__ import annotations

import platform
import time

import torch

__all__ = ["device_name", "timed"]


def device_name(device) -> str:
    """The card's or the CPU's name, recorded beside every timing."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU: {model} ({torch.get_num_threads()} threads)"


def timed(fn, device="cpu"):
    """Run `fn()` and return (result, seconds), synchronising CUDA around it."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start
