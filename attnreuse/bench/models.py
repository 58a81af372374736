"""Denoisers to time, with random weights (speed does not depend on the weights), and the inputs of one call: the
SD1.5 and SDXL UNets and the PixArt-Sigma, SD3 Medium and FLUX.1-dev transformers from their published configs
(`configs/`), or the tiny local architectures of `attnreuse.pipelines.tiny`."""

from __future__ import annotations

import inspect
import json
from importlib import resources

import torch

from ..pipelines.tiny import (
    ARCHS,
    MODEL_ONLY,
    build_denoiser,
    denoiser_class,
    denoiser_inputs,
    denoiser_model,
    unet_config,
    with_layers,
)

__all__ = ["RESOLUTION", "TRANSFORMERS", "build_transformer", "build_unet", "resolution"]

RESOLUTION = {"sd15": 512, "sdxl": 1024}

# Published transformers (configs/<arch>_transformer.json): family, image size (pixels) and the text tokens their
# pipelines send: PixArt-Sigma 300 T5 tokens, SD3 77 CLIP + 256 T5, FLUX.1-dev 512 T5. All use 8x VAEs.
TRANSFORMERS = {
    "pixart-sigma": dict(family="pixart", size=1024, text_tokens=300),
    "sd3-medium": dict(family="sd3", size=1024, text_tokens=333),
    "flux-dev": dict(family="flux", size=1024, text_tokens=512),
}


def resolution(arch: str) -> int:
    """An architecture's own image size in pixels."""
    if arch in TRANSFORMERS:
        return TRANSFORMERS[arch]["size"]
    return RESOLUTION.get(arch) or (ARCHS.get(arch) or MODEL_ONLY[arch])["size"]


def _published(arch: str) -> dict:
    """The published transformer config of `arch` with the keys its diffusers class takes (PixArt-Sigma's was
    written for Transformer2DModel, and has four more), without notes such as "_comment"."""
    config = json.loads(resources.files(__package__).joinpath(f"configs/{arch}_transformer.json").read_text())
    known = inspect.signature(denoiser_class(TRANSFORMERS[arch]["family"]).__init__).parameters
    return {k: v for k, v in config.items() if k in known}


def _config(arch: str) -> tuple[dict, int]:
    """The UNet config of `arch` and its VAE's downsampling factor."""
    if arch in TRANSFORMERS or arch in MODEL_ONLY or ARCHS.get(arch, {}).get("family", "unet") != "unet":
        raise ValueError(f"{arch!r} is a transformer architecture: build it with build_transformer.")
    if arch in ARCHS and arch not in RESOLUTION:  # the tests' tiny architectures
        spec = ARCHS[arch]
        factor = 2 ** (len(spec["vae"]) - 1)  # the VAE's downsampling, as in pipelines.tiny.build_pipeline
        return dict(unet_config(arch), sample_size=spec["size"] // factor, in_channels=4, out_channels=4), factor
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


def build_transformer(arch: str, device, dtype, batch: int, size: int | None = None, layers: int | None = None,
                      text_tokens: int | None = None):
    """A random-weight DiT of `arch` and the keyword inputs of one call, timestep included: `model(**inputs)`.

    `arch`: a published config (TRANSFORMERS: pixart-sigma, sd3-medium, flux-dev) or a tiny one of
    attnreuse.pipelines.tiny (tiny-pixart, tiny-sd3, tiny-flux, tiny-wan). Images of `size` pixels (default the
    architecture's own, 1024 for the published ones) and `text_tokens` text tokens (default what its pipeline
    sends). A published config keeps its widths, heads and text widths as published; `layers` only keeps that many
    transformer blocks (Flux: that many double-stream and as many single-stream blocks), which with a small `size`
    and fewer `text_tokens` is the "reduced size" a CPU runs. Full size: leave `layers`, `size` and `text_tokens`.
    """
    if arch not in TRANSFORMERS:
        if (ARCHS.get(arch) or MODEL_ONLY.get(arch, {})).get("family", "unet") == "unet":
            raise ValueError(f"Unknown transformer {arch!r}; choose from {sorted(TRANSFORMERS)} (or a tiny one).")
        return build_denoiser(arch, batch=batch, dtype=dtype, device=device, size=size, text_tokens=text_tokens,
                              layers=layers)
    spec = TRANSFORMERS[arch]
    config = with_layers(spec["family"], _published(arch), layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = denoiser_model(spec["family"], config, dtype)
    latent = (size or spec["size"]) // 8
    inputs = denoiser_inputs(spec["family"], config, batch, latent, text_tokens or spec["text_tokens"], device, dtype)
    return model, inputs
