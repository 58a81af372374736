"""The default model's architecture: configs of its parts, and fresh (untrained) components from a seed."""

from __future__ import annotations

from pathlib import Path

import torch

from ..utils import SD_SCHEDULER, write_clip_tokenizer
from .shapes import IMAGE_SIZE, VOCABULARY

__all__ = ["MAX_TOKENS", "LATENT_SIZE", "VAE", "TEXT", "UNET", "build_components"]

MAX_TOKENS = 16  # the longest caption of the grammar is 10 words + 2 special tokens
LATENT_SIZE = IMAGE_SIZE // 4

VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
           norm_num_groups=16, sample_size=IMAGE_SIZE)
TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=MAX_TOKENS, projection_dim=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
UNET = dict(sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
            attention_head_dim=4, norm_num_groups=32)


def build_components(seed: int = 0, tokenizer_dir: str | Path | None = None) -> dict:
    """Fresh (untrained) components of the default model, initialised from `seed`."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(tokenizer_dir or tempfile.mkdtemp(prefix="attnreuse-tok-"), VOCABULARY,
                                     max_length=MAX_TOKENS)
    return dict(
        vae=AutoencoderKL(**VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**UNET),
        scheduler=DDIMScheduler(**SD_SCHEDULER),
    )
