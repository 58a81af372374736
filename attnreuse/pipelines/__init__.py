"""Building and running diffusers pipelines for the tools: samplers by name, seeded generation, the denoising loop
step by step, timing, and tiny pipelines built from configs (random weights, nothing downloaded)."""

from .sampling import SAMPLERS, GenerationSetup, generate, load_pipeline, use_sampler
from .timing import device_name, timed

__all__ = ["SAMPLERS", "GenerationSetup", "generate", "load_pipeline", "use_sampler", "device_name", "timed"]
