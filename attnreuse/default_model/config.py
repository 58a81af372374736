"""The default models' architectures: configs of their parts, and fresh (untrained) components from a seed.

Two denoiser families share the data, the VAE and the recipe: `unet` (a `StableDiffusionPipeline`: UNet and a CLIP
text encoder) and `dit` (a `PixArtAlphaPipeline`: a PixArt transformer and a T5 text encoder, beside the shipped
UNet model's VAE, frozen)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..pipelines.sampling import SD_SCHEDULER
from ..pipelines.tokenizers import write_clip_tokenizer, write_t5_tokenizer
from .shapes import IMAGE_SIZE, VOCABULARY

__all__ = ["ARCHS", "MAX_TOKENS", "LATENT_SIZE", "VAE", "TEXT", "UNET", "T5_TEXT", "DIT", "T5_MAX_LENGTH",
           "build_components"]

ARCHS = ("unet", "dit")  # the denoiser families of the default models

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
# the DiT: a T5 encoder (relative positions, so any padded length; masked, so padding changes nothing) and a
# PixArt transformer over the 8x8 patches (patch 2) of the 16x16 latent, self- and cross-attention in each block
T5_MAX_LENGTH = 120  # the tokenizer's model_max_length: what PixArtAlphaPipeline pads prompts to by default
T5_TEXT = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
               feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
DIT = dict(sample_size=LATENT_SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=8, num_attention_heads=3,
           attention_head_dim=64, cross_attention_dim=192, caption_channels=T5_TEXT["d_model"],
           norm_type="ada_norm_single")


def build_components(seed: int = 0, tokenizer_dir: str | Path | None = None, arch: str = "unet") -> dict:
    """Fresh (untrained) components of the default model of `arch` ("unet" or "dit"), initialised from `seed`; the
    DiT's VAE is the shipped UNet model's (trained, frozen)."""
    import tempfile

    from diffusers import DDIMScheduler

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}.")
    torch.manual_seed(seed)
    tokenizer_dir = tokenizer_dir or tempfile.mkdtemp(prefix="attnreuse-tok-")
    parts = _unet_parts(tokenizer_dir) if arch == "unet" else _dit_parts(tokenizer_dir)
    return dict(parts, scheduler=DDIMScheduler(**SD_SCHEDULER))


def _unet_parts(tokenizer_dir) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = write_clip_tokenizer(tokenizer_dir, VOCABULARY, max_length=MAX_TOKENS)
    return dict(vae=AutoencoderKL(**VAE), text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT)),
                tokenizer=tokenizer, unet=UNet2DConditionModel(**UNET))


def _dit_parts(tokenizer_dir) -> dict:
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from . import DEFAULT_MODEL_DIR

    vae_dir = DEFAULT_MODEL_DIR / "vae"
    if not (vae_dir / "config.json").exists():
        raise FileNotFoundError(f"The DiT reuses the shipped UNet model's VAE, and {vae_dir} is missing; train the "
                                "UNet model first (`attnreuse train-default`) and ship it there.")
    tokenizer = write_t5_tokenizer(tokenizer_dir, VOCABULARY, max_length=T5_MAX_LENGTH)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **T5_TEXT))
    transformer = PixArtTransformer2DModel(**DIT)
    _init_dit(transformer)
    return dict(vae=AutoencoderKL.from_pretrained(vae_dir).requires_grad_(False).eval(), text_encoder=text_encoder,
                tokenizer=tokenizer, transformer=transformer)


def _init_dit(transformer) -> None:
    """PixArt's initialisation (DiT's, Peebles and Xie 2023): Xavier linear layers and patch embedding, N(0, 0.02)
    timestep and caption embeddings, and zeros for the cross-attention outputs and the final projection, so that
    each block starts as the identity and the model predicts zero."""
    nn = torch.nn
    for module in transformer.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = transformer.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    emb = transformer.adaln_single.emb.timestep_embedder
    for linear in (emb.linear_1, emb.linear_2, transformer.adaln_single.linear,
                   transformer.caption_projection.linear_1, transformer.caption_projection.linear_2):
        nn.init.normal_(linear.weight, std=0.02)
    for linear in [block.attn2.to_out[0] for block in transformer.transformer_blocks] + [transformer.proj_out]:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
