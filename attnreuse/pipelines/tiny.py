"""Tiny pipelines built locally from configs, with random weights and a tokenizer written here.

For tests, benchmarks and trying the API offline: nothing is downloaded. Random weights are fine for structure
and speed, not for image quality (the shipped default model is for quality).

Families (`ARCHS[arch]["family"]`): "unet" (SD 1.x, SDXL, SD with a ControlNet) and the transformer (DiT) ones,
"pixart" (PixArt-Sigma), "sd3" (SD3 / SD3.5 MMDiT) and "flux" (FLUX.1, also with a ControlNet). `build_pipeline`
gives a whole pipeline, `build_denoiser` the denoiser alone with the inputs of one call (also for `MODEL_ONLY`
architectures such as the tiny Wan video DiT, which have no pipeline here).
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from .sampling import SD_SCHEDULER
from .tokenizers import write_clip_tokenizer, write_t5_tokenizer

__all__ = ["ARCHS", "MODEL_ONLY", "DEFAULT_WORDS", "arch_spec", "build_denoiser", "build_pipeline", "control_image",
           "denoiser_class", "denoiser_inputs", "denoiser_model", "example_call", "unet_config", "with_layers"]

DEFAULT_WORDS = (
    "a an the of and with on in at to left right above below top bottom center small large big "
    "red orange yellow green blue purple white black gray circle square triangle shape photo cat dog "
    "house tree car bird flower painting picture"
).split()

# two levels, self- and cross-attention at the highest latent resolution, as in SD 1.x
_TINY_SD = dict(
    family="unet",
    unet=dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",
              "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
              attention_head_dim=4, norm_num_groups=16),
    vae=(16, 32), text=32, size=32)

# FLUX.1-dev's scheduler: flow matching, its shift growing with the image's token count
_FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                       max_image_seq_len=4096)

# Each architecture: its family (which pipeline and denoiser), the denoiser's config (`unet` or `transformer`), VAE
# channels (one level per entry, downsampling 2**(levels - 1) times) with its latent channels (`latent`, default 4)
# and extra VAE config, text encoder widths (CLIP `text`, T5 `t5`), the text tokens the pipeline sends its denoiser
# (`text_tokens`), the scheduler (class name, config; default DDIM), and the image size in pixels (`size`).
ARCHS = {
    "tiny-sd": _TINY_SD,
    # SDXL-style: text_time added conditioning, two text encoders, several transformer layers per block
    "tiny-sdxl": dict(
        family="unet", xl=True,
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D",
                  "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                  projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=16),
        vae=(16, 32), text=32, size=32),
    # Stable Diffusion 1.5's UNet (its published config, bench/configs) at 384 px, beside a small VAE and a
    # 768-wide text encoder: the architecture whose calls a plan is costed on, at a size a CPU runs
    "sd15": dict(family="unet", unet="sd15_unet.json", vae=(16, 32, 64, 64), text=768, size=384),
    # the SD 1.x block layout (3 cross-attention levels, 8 heads) at reduced width, for CPU speed runs
    "small-sd": dict(
        family="unet",
        unet=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=128,
                  attention_head_dim=8, norm_num_groups=32),
        vae=(32, 32, 64, 64), text=128, size=256),
    # tiny-sd's parts (the same weights for a seed) and a ControlNet copied from its UNet, its conditioning
    # embedding downsampling the control image 2x like the VAE; call it with image=control_image(32)
    "tiny-sd-controlnet": dict(_TINY_SD, controlnet=dict(conditioning_embedding_out_channels=(16, 32))),
    # PixArt-Sigma: self-attention over 2x2 latent patches, cross-attention to 300 T5 tokens, adaLN-single
    "tiny-pixart": dict(
        family="pixart",
        transformer=dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                         cross_attention_dim=32, caption_channels=32, sample_size=16, patch_size=2,
                         use_additional_conditions=False),
        vae=(16, 32), t5=32, text_tokens=300, scheduler=("DPMSolverMultistepScheduler", {}), size=32),
    # SD3.5-style MMDiT: joint attention over image patches and 77 CLIP + 256 T5 tokens, RMS q/k norms, and a
    # second (image-only) attention in layer 0 as in SD3.5 Medium's dual-attention layers
    "tiny-sd3": dict(
        family="sd3",
        transformer=dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                         attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                         caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32,
                         qk_norm="rms_norm", dual_attention_layers=(0,)),
        vae=(16, 32), latent=16, vae_config=dict(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                                                 use_post_quant_conv=False),
        text=32, t5=64, text_tokens=333, scheduler=("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)), size=32),
    # FLUX.1-dev-style: a double-stream (joint) and a single-stream block, rotary embeddings on 3 axes (4 + 6 + 6 =
    # the head dim), guidance embedding; 2x2-packed latents, 512 T5 tokens
    "tiny-flux": dict(
        family="flux",
        transformer=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                         guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        vae=(16, 32), latent=16, vae_config=dict(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                                                 use_post_quant_conv=False),
        text=32, t5=32, text_tokens=512, scheduler=("FlowMatchEulerDiscreteScheduler", _FLUX_SCHEDULER), size=32),
}
# tiny-flux and a FluxControlNetModel (one block of each kind); call it with control_image=control_image(32)
ARCHS["tiny-flux-controlnet"] = dict(ARCHS["tiny-flux"], controlnet=dict(num_layers=1, num_single_layers=1))

# Denoisers without a pipeline here (build_denoiser only). `frames`: latent frames (Wan's VAE: 4 video frames each
# after the first), `vae_factor`: the spatial downsampling of the VAE the model is meant for.
MODEL_ONLY = {
    # Wan 2.1-style video DiT: self-attention with 3-axis rotary embeddings over (1, 2, 2) patches, cross-attention
    # to 512 text tokens, RMS q/k norms across heads
    "tiny-wan": dict(
        family="wan",
        transformer=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                         out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                         qk_norm="rms_norm_across_heads", rope_max_seq_len=64),
        vae_factor=8, frames=3, text_tokens=512, size=128),
}

_MODEL_CLASS = {"unet": "UNet2DConditionModel", "pixart": "PixArtTransformer2DModel", "sd3": "SD3Transformer2DModel",
                "flux": "FluxTransformer2DModel", "wan": "WanTransformer3DModel"}
_BLOCKS = {"pixart": ("num_layers",), "sd3": ("num_layers",), "flux": ("num_layers", "num_single_layers"),
           "wan": ("num_layers",)}
# a ControlNet's zero-initialized layers: its outputs (and Flux's conditioning input)
_ZERO_INIT = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_blocks.", "controlnet_single_blocks.",
              "controlnet_x_embedder.", "controlnet_cond_embedding.conv_out.")


def arch_spec(arch: str) -> dict:
    """The entry of `arch` in ARCHS or MODEL_ONLY, or a ValueError naming the choices."""
    spec = ARCHS.get(arch) or MODEL_ONLY.get(arch)
    if spec is None:
        raise ValueError(f"Unknown architecture {arch!r}; choose from {sorted(ARCHS)} (or, a model only, "
                         f"{sorted(MODEL_ONLY)}).")
    return spec


def _published(config):
    """A config given inline, or the file name of a published one in bench/configs (its "_" notes dropped)."""
    if isinstance(config, str):
        config = json.loads((Path(__file__).parent / "bench" / "configs" / config).read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    return dict(config)


def unet_config(arch: str) -> dict:
    """The UNet config of an architecture: its own keywords, or a published config kept in bench/configs."""
    return _published(ARCHS[arch]["unet"])


def _vae_factor(spec: dict) -> int:
    """How many times the architecture's VAE downsamples an image."""
    return spec.get("vae_factor") or 2 ** (len(spec["vae"]) - 1)  # as diffusers' vae_scale_factor


def _denoiser_config(spec: dict) -> dict:
    """The config the denoiser of an ARCHS / MODEL_ONLY entry is built from."""
    if spec["family"] == "unet":
        side = spec["size"] // _vae_factor(spec)
        return dict(_published(spec["unet"]), sample_size=side, in_channels=4, out_channels=4)
    return dict(spec["transformer"])


def denoiser_class(family: str):
    """The diffusers class of a family's denoiser: UNet2DConditionModel, or the PixArt / SD3 / Flux / Wan DiT."""
    import diffusers

    return getattr(diffusers, _MODEL_CLASS[family])


def denoiser_model(family: str, config: dict, dtype: torch.dtype = torch.float32):
    """The denoiser of a family built from `config` (random weights), in `dtype`, in eval mode."""
    model = denoiser_class(family).from_config(config).eval()
    # torch's own cast: diffusers' ModelMixin.to warns about "modules kept in float32" on any dtype, even with none
    return model if dtype == torch.float32 else torch.nn.Module.to(model, dtype)


def with_layers(family: str, config: dict, layers: int | None) -> dict:
    """`config` keeping `layers` blocks of each kind (Flux: double- and single-stream); widths and heads unchanged."""
    if layers is None:
        return dict(config)
    if family not in _BLOCKS:
        raise ValueError(f"Only transformer denoisers take a block count, not {family!r} ones.")
    config = dict(config, **{key: layers for key in _BLOCKS[family]})
    if config.get("dual_attention_layers"):  # SD3.5: those past the kept blocks go
        config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < layers)
    return config


def _vae(spec: dict):
    """The AutoencoderKL of an architecture: one level per entry of spec["vae"]."""
    from diffusers import AutoencoderKL

    levels = len(spec["vae"])
    return AutoencoderKL(block_out_channels=spec["vae"], in_channels=3, out_channels=3,
                         latent_channels=spec.get("latent", 4), down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, norm_num_groups=16, sample_size=spec["size"],
                         **spec.get("vae_config", {}))


def _scheduler(spec: dict):
    """The architecture's scheduler: DDIM with SD's config unless the entry names another."""
    import diffusers

    name, config = spec.get("scheduler", ("DDIMScheduler", SD_SCHEDULER))
    return getattr(diffusers, name)(**config)


def _text_encoder(width: int, vocab_size: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
                            num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=77,
                            projection_dim=width, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5_encoder(width: int, vocab_size: int):
    """A tiny T5 v1.1-style encoder (gated GELU, relative position buckets): PixArt's, SD3's and Flux's."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _tokenizers():
    """A word-level CLIP tokenizer and a T5-style one of DEFAULT_WORDS, written to a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="attnreuse-tok-"))
    return write_clip_tokenizer(folder / "clip", DEFAULT_WORDS), write_t5_tokenizer(folder / "t5", DEFAULT_WORDS)


def _unzero(controlnet):
    """PyTorch's default random init for a ControlNet's zero-initialized layers: the control image then matters."""
    for name, module in controlnet.named_modules():
        if f"{name}.".startswith(_ZERO_INIT) and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return controlnet


@functools.cache
def _pixart_class():
    """PixArtSigmaPipeline at any size: no resolution binning (its bins start at 256 px), no caption cleaning."""
    from diffusers import PixArtSigmaPipeline

    class TinyPixArtSigmaPipeline(PixArtSigmaPipeline):
        def __call__(self, *args, use_resolution_binning: bool = False, clean_caption: bool = False, **kwargs):
            return super().__call__(*args, use_resolution_binning=use_resolution_binning,
                                    clean_caption=clean_caption, **kwargs)

    return TinyPixArtSigmaPipeline


def _unet_pipeline(spec: dict):
    """An SD 1.x pipeline (with a ControlNet if the entry has one) or an SDXL one."""
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    unet = UNet2DConditionModel(**_denoiser_config(spec))
    vae = _vae(spec)
    scheduler = _scheduler(spec)
    tokenizer = write_clip_tokenizer(tempfile.mkdtemp(prefix="attnreuse-tok-"), DEFAULT_WORDS)
    vocab = len(tokenizer)
    parts = dict(unet=unet, vae=vae, scheduler=scheduler, tokenizer=tokenizer,
                 text_encoder=_text_encoder(spec["text"], vocab))
    if spec.get("xl"):
        parts.update(text_encoder_2=_text_encoder(spec["text"], vocab, projection=True), tokenizer_2=tokenizer)
        return StableDiffusionXLPipeline(**parts)
    sd = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if "controlnet" in spec:
        controlnet = _unzero(ControlNetModel.from_unet(unet, **spec["controlnet"]))
        return StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, **sd)
    return StableDiffusionPipeline(**parts, **sd)


def _pixart_pipeline(spec: dict):
    """A PixArt-Sigma pipeline: the DiT, a VAE, a T5 encoder and its tokenizer."""
    transformer, vae = denoiser_model("pixart", spec["transformer"]), _vae(spec)
    _, t5 = _tokenizers()
    return _pixart_class()(tokenizer=t5, text_encoder=_t5_encoder(spec["t5"], len(t5)), vae=vae,
                           transformer=transformer, scheduler=_scheduler(spec))


def _sd3_pipeline(spec: dict):
    """An SD3 pipeline: the MMDiT, a VAE, two CLIP encoders with projection and a T5 encoder."""
    from diffusers import StableDiffusion3Pipeline

    transformer, vae = denoiser_model("sd3", spec["transformer"]), _vae(spec)
    clip, t5 = _tokenizers()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=_scheduler(spec), vae=vae, tokenizer=clip, tokenizer_2=clip,
        text_encoder=_text_encoder(spec["text"], len(clip), projection=True),
        text_encoder_2=_text_encoder(spec["text"], len(clip), projection=True),
        text_encoder_3=_t5_encoder(spec["t5"], len(t5)), tokenizer_3=t5)


def _flux_pipeline(spec: dict):
    """A Flux pipeline (with a FluxControlNetModel if the entry has one): DiT, VAE, CLIP and T5 encoders."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxPipeline

    transformer, vae = denoiser_model("flux", spec["transformer"]), _vae(spec)
    clip, t5 = _tokenizers()
    parts = dict(transformer=transformer, scheduler=_scheduler(spec), vae=vae, tokenizer=clip, tokenizer_2=t5,
                 text_encoder=_text_encoder(spec["text"], len(clip)), text_encoder_2=_t5_encoder(spec["t5"], len(t5)))
    if "controlnet" not in spec:
        return FluxPipeline(**parts)
    controlnet = _unzero(FluxControlNetModel(**dict(spec["transformer"], **spec["controlnet"])).eval())
    return FluxControlNetPipeline(**parts, controlnet=controlnet)


_PIPELINES = {"unet": _unet_pipeline, "pixart": _pixart_pipeline, "sd3": _sd3_pipeline, "flux": _flux_pipeline}


def build_pipeline(arch: str = "tiny-sd", seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu"):
    """A complete diffusers pipeline of the named architecture (see ARCHS) with random weights.

    >>> pipe = build_pipeline("tiny-sd")
    >>> image = pipe("a red circle", num_inference_steps=4, height=32, width=32).images[0]
    >>> image = build_pipeline("tiny-flux")("a red circle", **example_call("tiny-flux")).images[0]
    """
    if arch not in ARCHS:
        arch_spec(arch)  # an unknown name raises here
        raise ValueError(f"{arch!r} is a model without a pipeline here; build it with build_denoiser({arch!r}).")
    spec = ARCHS[arch]
    torch.manual_seed(seed)
    pipe = _PIPELINES[spec["family"]](spec)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)


def control_image(size: int):
    """A control image of `size` pixels for the ControlNet architectures: a white square on black."""
    from PIL import Image

    image = np.zeros((size, size, 3), np.uint8)
    image[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
    return Image.fromarray(image)


def example_call(arch: str, steps: int = 2) -> dict:
    """Keywords of one small generation with build_pipeline(arch): steps, its size, and a ControlNet's control image."""
    spec = ARCHS[arch]
    kwargs = dict(num_inference_steps=steps, height=spec["size"], width=spec["size"])
    if "controlnet" in spec:
        kwargs["control_image" if spec["family"] == "flux" else "image"] = control_image(spec["size"])
    return kwargs


def _unet_inputs(config, batch, side, tokens, frames, randn):
    inputs = dict(sample=randn(batch, config["in_channels"], side, side), timestep=torch.full((batch,), 500.0),
                  encoder_hidden_states=randn(batch, tokens, config["cross_attention_dim"]))
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text and size conditioning
        text = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        size = float(side * 8)
        inputs["added_cond_kwargs"] = dict(text_embeds=randn(batch, text),
                                           time_ids=torch.tensor([[size, size, 0.0, 0.0, size, size]] * batch))
    return inputs


def _pixart_inputs(config, batch, side, tokens, frames, randn):
    added = dict(resolution=None, aspect_ratio=None)
    if config.get("use_additional_conditions"):  # PixArt-alpha 1024's micro-conditions
        added = dict(resolution=torch.full((batch, 2), side * 8.0), aspect_ratio=torch.ones(batch, 1))
    return dict(hidden_states=randn(batch, config["in_channels"], side, side), timestep=torch.full((batch,), 500.0),
                encoder_hidden_states=randn(batch, tokens, config["caption_channels"]),
                encoder_attention_mask=torch.ones(batch, tokens), added_cond_kwargs=added)


def _sd3_inputs(config, batch, side, tokens, frames, randn):
    return dict(hidden_states=randn(batch, config["in_channels"], side, side), timestep=torch.full((batch,), 500.0),
                encoder_hidden_states=randn(batch, tokens, config["joint_attention_dim"]),
                pooled_projections=randn(batch, config["pooled_projection_dim"]))


def _flux_inputs(config, batch, side, tokens, frames, randn):
    """Flux's call: 2x2-packed latents with their (0, row, column) ids, text with zero ids, timestep in [0, 1]."""
    half = side // 2
    rows, columns = torch.meshgrid(torch.arange(half), torch.arange(half), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, columns], -1).reshape(-1, 3).float()
    inputs = dict(hidden_states=randn(batch, half * half, config["in_channels"]), timestep=torch.full((batch,), 0.5),
                  encoder_hidden_states=randn(batch, tokens, config["joint_attention_dim"]),
                  pooled_projections=randn(batch, config["pooled_projection_dim"]), img_ids=img_ids,
                  txt_ids=torch.zeros(tokens, 3))
    if config.get("guidance_embeds"):  # FLUX.1-dev's distilled guidance
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def _wan_inputs(config, batch, side, tokens, frames, randn):
    return dict(hidden_states=randn(batch, config["in_channels"], frames, side, side),
                timestep=torch.full((batch,), 500.0), encoder_hidden_states=randn(batch, tokens, config["text_dim"]))


_INPUTS = {"unet": _unet_inputs, "pixart": _pixart_inputs, "sd3": _sd3_inputs, "flux": _flux_inputs,
           "wan": _wan_inputs}


def _moved(value, device, dtype):
    if isinstance(value, dict):
        return {k: _moved(v, device, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    return value


def denoiser_inputs(family: str, config: dict, batch: int, latent: int, text_tokens: int, device="cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0, frames: int = 1) -> dict:
    """Random keyword inputs of one call of a `family` denoiser built from `config`: latents `latent` wide."""
    generator = torch.Generator().manual_seed(seed)
    inputs = _INPUTS[family](config, batch, latent, text_tokens, frames,
                             lambda *shape: torch.randn(*shape, generator=generator))
    return _moved(inputs, torch.device(device), dtype)


def build_denoiser(arch: str, seed: int = 0, batch: int = 1, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", size: int | None = None, text_tokens: int | None = None,
                   layers: int | None = None):
    """The denoiser of `arch` alone (random weights, as build_pipeline's) and the keyword inputs of one call."""
    spec = arch_spec(arch)
    family = spec["family"]
    config = with_layers(family, _denoiser_config(spec), layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = denoiser_model(family, config, dtype)
    latent = (size or spec["size"]) // _vae_factor(spec)
    tokens = text_tokens or spec.get("text_tokens", 77)
    return model, denoiser_inputs(family, config, batch, latent, tokens, device, dtype, seed, spec.get("frames", 1))
