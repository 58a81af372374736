"""Tiny pipelines built locally from configs, with random weights and a tokenizer written here.

For tests, benchmarks and trying the API offline: nothing is downloaded. Random weights are fine for structure
and speed, not for image quality (the shipped default model is for quality).
"""

from __future__ import annotations

import tempfile

import torch

from .utils import SD_SCHEDULER, write_clip_tokenizer

__all__ = ["ARCHS", "build_pipeline", "DEFAULT_WORDS"]

DEFAULT_WORDS = (
    "a an the of and with on in at to left right above below top bottom center small large big "
    "red orange yellow green blue purple white black gray circle square triangle shape photo cat dog "
    "house tree car bird flower painting picture"
).split()

# Each architecture: UNet config, VAE channels (one level per entry), text width, image size (pixels).
ARCHS = {
    # two levels, self- and cross-attention at the highest latent resolution, as in SD 1.x
    "tiny-sd": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",
                  "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=4, norm_num_groups=16),
        vae=(16, 32), text=32, size=32),
    # SDXL-style: text_time added conditioning, two text encoders, several transformer layers per block
    "tiny-sdxl": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D",
                  "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                  projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=16),
        vae=(16, 32), text=32, size=32),
    # the SD 1.x block layout (3 cross-attention levels, 8 heads) at reduced width, for CPU speed runs
    "small-sd": dict(
        unet=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=128,
                  attention_head_dim=8, norm_num_groups=32),
        vae=(32, 32, 64, 64), text=128, size=256),
}


def _text_encoder(width: int, vocab_size: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
                            num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=77,
                            projection_dim=width, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def build_pipeline(arch: str = "tiny-sd", seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu"):
    """A complete diffusers SD (or SDXL) pipeline of the named architecture with random weights.

    >>> pipe = build_pipeline("tiny-sd")
    >>> image = pipe("a red circle", num_inference_steps=4, height=32, width=32).images[0]
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    if arch not in ARCHS:
        raise ValueError(f"Unknown architecture {arch!r}; choose from {sorted(ARCHS)}.")
    spec = ARCHS[arch]
    torch.manual_seed(seed)
    factor = 2 ** (len(spec["vae"]) - 1)  # the VAE's downsampling, as in diffusers' vae_scale_factor
    unet = UNet2DConditionModel(sample_size=spec["size"] // factor, in_channels=4, out_channels=4, **spec["unet"])
    vae = AutoencoderKL(block_out_channels=spec["vae"], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * len(spec["vae"]),
                        up_block_types=("UpDecoderBlock2D",) * len(spec["vae"]), norm_num_groups=16,
                        sample_size=spec["size"])
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    tokenizer = write_clip_tokenizer(tempfile.mkdtemp(prefix="attnreuse-tok-"), DEFAULT_WORDS)
    vocab = len(tokenizer)
    parts = dict(unet=unet, vae=vae, scheduler=scheduler, tokenizer=tokenizer,
                 text_encoder=_text_encoder(spec["text"], vocab))
    if arch.endswith("sdxl"):
        parts.update(text_encoder_2=_text_encoder(spec["text"], vocab, projection=True), tokenizer_2=tokenizer)
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
