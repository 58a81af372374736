"""Loading pipelines, choosing samplers, and timing generations side by side."""

from __future__ import annotations

import platform
import time

import torch

__all__ = ["SAMPLERS", "use_sampler", "load_pipeline", "device_name", "timed"]

# CLI names -> (diffusers scheduler class name, extra config)
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),  # second order: 2 model calls per step, 1 at the last
    "dpm2": ("KDPM2DiscreteScheduler", {}),  # second order, as heun
}


def use_sampler(pipe, name: str):
    """Swap the pipeline's scheduler for the named sampler, keeping its noise schedule config."""
    import diffusers

    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; choose from {sorted(SAMPLERS)}.")
    cls_name, extra = SAMPLERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    return pipe


def load_pipeline(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A local architecture name (see `attnreuse.local.ARCHS`, random weights) or a diffusers path / hub id."""
    from .local import ARCHS, build_pipeline

    if model in ARCHS:
        return build_pipeline(model, dtype=dtype, device=device)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


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

