"""UNets to time: the SD1.5 and SDXL architectures from their published configs (`configs/`), or the tiny local
ones, with random weights (speed does not depend on the weights), and the inputs of one call."""

from __future__ import annotations

import json
from importlib import resources

import torch

from ..testing import ARCHS

__all__ = ["RESOLUTION", "build_unet", "resolution"]

RESOLUTION = {"sd15": 512, "sdxl": 1024}


def resolution(arch: str) -> int:
    """An architecture's own image size in pixels."""
    return RESOLUTION.get(arch) or ARCHS[arch]["size"]


def _config(arch: str) -> tuple[dict, int]:
    """The UNet config of `arch` and its VAE's downsampling factor."""
    if arch in ARCHS:  # the tests' tiny architectures
        spec = ARCHS[arch]
        factor = 2 ** (len(spec["vae"]) - 1)  # the VAE's downsampling, as in testing.build_pipeline
        return dict(spec["unet"], sample_size=spec["size"] // factor, in_channels=4, out_channels=4), factor
    if arch in RESOLUTION:
        config = json.loads(resources.files(__package__).joinpath(f"configs/{arch}_unet.json").read_text())
        config.pop("_comment", None)
        return config, 8
    raise ValueError(f"Unknown architecture {arch!r}; choose from {sorted(RESOLUTION)} (or {sorted(ARCHS)}).")


def build_unet(arch: str, device, dtype, batch: int, size: int | None = None):
    """A random-weight UNet of `arch` and the keyword inputs of one call at batch `batch` (images of `size`
    pixels, default the architecture's own)."""
    from diffusers import UNet2DConditionModel

    config, factor = _config(arch)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config).to(dtype).eval()
    size = size // factor if size else config["sample_size"]
    g = torch.Generator(device).manual_seed(0)
    inputs = dict(sample=torch.randn(batch, 4, size, size, generator=g, device=device, dtype=dtype),
                  encoder_hidden_states=torch.randn(batch, 77, config["cross_attention_dim"], generator=g,
                                                    device=device, dtype=dtype))
    if config.get("addition_embed_type") == "text_time":
        text = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(batch, text, generator=g, device=device, dtype=dtype),
            time_ids=torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch, device=device, dtype=dtype))
    return unet, inputs
