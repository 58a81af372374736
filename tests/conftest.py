import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import numpy as np
import pytest
import torch

from attnreuse.local import build_pipeline

STEPS = 6


@pytest.fixture
def sd_pipe():
    """A fresh tiny SD-1.x-style pipeline (random weights, local tokenizer)."""
    return build_pipeline("tiny-sd", seed=0)


@pytest.fixture
def sdxl_pipe():
    return build_pipeline("tiny-sdxl", seed=0)


def run(pipe, prompt="a red circle left of a blue square", steps=STEPS, seed=0, **kwargs):
    """Generate with a fixed seed and return the images as a float array."""
    kwargs.setdefault("output_type", "np")
    out = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs)
    return np.asarray(out.images)


def attention_modules(pipe, kind=None):
    """(name, module) of the UNet's attention layers; kind 'self' (attn1) or 'cross' (attn2) or None for both."""
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in pipe.unet.named_modules() if isinstance(m, Attention)
            and (kind is None or (kind == "cross") == bool(m.is_cross_attention))]


class CallCounter:
    """Counts calls of chosen submodules with forward hooks."""

    def __init__(self, modules):
        self.counts = {name: 0 for name, _ in modules}
        self.hooks = [m.register_forward_hook(self._hook(name)) for name, m in modules]

    def _hook(self, name):
        def hook(module, args, output):
            self.counts[name] += 1
        return hook

    def values(self):
        return set(self.counts.values())

    def remove(self):
        for h in self.hooks:
            h.remove()
