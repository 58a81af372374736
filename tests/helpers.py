"""What the tests share: tiny pipelines' generation, counting calls, a one-layer model, map rounding."""

import numpy as np
import torch
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention

from attnreuse.attention.math import FP8_SCALE

STEPS = 6


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


class OneLayer(torch.nn.Module, AttentionMixin):
    """A model holding one diffusers Attention layer (no timestep: generations are counted by length)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.attn = Attention(**kwargs)

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        extra = {} if temb is None else {"temb": temb}
        return self.attn(hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                         **extra)


MAP_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn]


def packed(attn_map, dtype):
    """A map as the cache keeps it: rounded to `dtype`, fp8 scaled by the format's largest value."""
    scale = FP8_SCALE.get(dtype, 1.0)
    return (attn_map * scale).to(dtype)


def assert_rounded(kept, expected):
    """Equal up to one step of the map's format: fp32 rounding before the cast can move a value across a
    rounding boundary."""
    step = torch.finfo(kept.dtype) if kept.dtype != torch.float32 else None
    torch.testing.assert_close(kept.float(), expected.float(), rtol=step.eps if step else 1e-5,
                               atol=step.tiny if step else 1e-6)


def assert_same_weights(folder_a, folder_b, files):
    """The safetensors `files` (paths inside each model folder) hold bit-identical tensors under the same names."""
    from safetensors.torch import load_file

    for name in files:
        a, b = load_file(folder_a / name), load_file(folder_b / name)
        assert a.keys() == b.keys(), name
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
