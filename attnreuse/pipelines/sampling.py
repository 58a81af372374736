"""Running a diffusers pipeline for the tools: samplers by name, loading, seeded generation, and the denoising loop
step by step (what the search scores and the bench times)."""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["SAMPLERS", "SD_SCHEDULER", "use_sampler", "load_pipeline", "generators", "generate", "GenerationSetup",
           "denoise_step", "Sampling", "quiet_image_processors"]


# CLI names -> (diffusers scheduler class name, extra config)
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),  # second order: 2 model calls per step, 1 at the last
    "dpm2": ("KDPM2DiscreteScheduler", {}),  # second order, as heun
}


# Stable Diffusion 1.x's noise schedule (DDIM), for pipelines built here
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000, prediction_type="epsilon",
                    timestep_spacing="leading")


def use_sampler(pipe, name: str):
    """Swap the pipeline's scheduler for the named sampler, keeping its noise schedule config."""
    import diffusers

    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; choose from {sorted(SAMPLERS)}.")
    cls_name, extra = SAMPLERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    return pipe


class _NoTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


@contextmanager
def quiet_image_processors():
    """While a pipeline loads: transformers' notice that an image processor (a pipeline's feature extractor, which
    nothing here uses) falls back from torchvision to PIL is left out; every other message of transformers stays."""
    import transformers.utils.import_utils  # noqa: F401  (its logger exists once imported)

    target, notice = logging.getLogger("transformers.utils.import_utils"), _NoTorchvisionNotice()
    target.addFilter(notice)
    try:
        yield
    finally:
        target.removeFilter(notice)


def load_pipeline(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from a local folder or a hub id, on `device`, without a progress bar."""
    with quiet_image_processors():  # importing a pipeline class imports its image processor
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generators(seeds, device="cpu") -> list[torch.Generator]:
    """One generator per image, seeded with its seed: image i gets the noise the pipeline draws from seeds[i]."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


def generate(pipe, prompts: list[str], seeds: list[int], batch_size: int | None = None, progress: bool = False,
             **kwargs) -> np.ndarray:
    """Images (N, H, W, 3) float32 in [0, 1] for prompts and per-image seeds, `batch_size` prompts per call."""
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"Need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds.")
    device = getattr(pipe, "device", "cpu")
    size = batch_size or len(prompts)
    out = []
    for start in tqdm(range(0, len(prompts), size), desc="generate", disable=not progress):
        chunk = slice(start, start + size)
        images = pipe(list(prompts[chunk]), generator=generators(seeds[chunk], device), output_type="np",
                      **kwargs).images
        out.append(np.asarray(images, dtype=np.float32))
    return np.concatenate(out)


@dataclass
class GenerationSetup:
    """What a set of images depends on besides the method: the pipeline, prompts, one seed per prompt, the step
    count and the guidance scale."""

    pipe: object
    prompts: list[str]
    seeds: list[int] = field(default_factory=list)
    num_steps: int = 20
    guidance: float = 7.5

    def __post_init__(self):
        self.prompts = list(self.prompts)
        self.seeds = [int(s) for s in self.seeds] if self.seeds else list(range(len(self.prompts)))
        if len(self.prompts) != len(self.seeds) or not self.prompts:
            raise ValueError(f"Need one seed per prompt, got {len(self.prompts)} prompts and {len(self.seeds)} seeds.")

    @property
    def device(self):
        return getattr(self.pipe, "device", torch.device("cpu"))

    def generate(self, progress: bool = False, **overrides) -> np.ndarray:
        """The images of this setup (float32 in [0, 1]); `overrides` go to the pipeline call."""
        kwargs = {"num_inference_steps": self.num_steps, "guidance_scale": self.guidance, **overrides}
        return generate(self.pipe, self.prompts, self.seeds, progress=progress, **kwargs)

    def subset(self, indices) -> GenerationSetup:
        return GenerationSetup(self.pipe, [self.prompts[i] for i in indices], [self.seeds[i] for i in indices],
                               self.num_steps, self.guidance)


def denoise_step(denoiser, scheduler, latents, t, guidance: float, cfg: bool = True, batch_timestep: bool = False,
                 **inputs):
    """One sampler step with classifier-free guidance, as diffusers' SD and PixArt pipelines run it: both branches
    in one batch (unconditional first), `guidance` times their difference added to the unconditional prediction;
    `batch_timestep` gives the denoiser one timestep per image (PixArt's), and of a learned-sigma output only the
    noise half is used."""
    x = torch.cat([latents] * 2) if cfg else latents
    timestep = t.expand(x.shape[0]) if batch_timestep and t.ndim == 0 else t
    eps = denoiser(scheduler.scale_model_input(x, t), timestep=timestep, return_dict=False, **inputs)[0]
    if cfg:
        uncond, cond = eps.chunk(2)
        eps = uncond + guidance * (cond - uncond)
    if eps.shape[1] == 2 * latents.shape[1]:  # learned sigma: the noise is the first half
        eps = eps.chunk(2, dim=1)[0]
    return scheduler.step(eps, t, latents, return_dict=False)[0]


class Sampling:
    """A pipeline's denoising loop step by step, as its `__call__` runs it, for SD (UNet) and PixArt pipelines: the
    first latents and scheduler, one step of a denoiser (the pipeline's or a patched one), the decoded images."""

    def __init__(self, setup: GenerationSetup):
        self.setup, pipe = setup, setup.pipe
        self.pixart = type(getattr(pipe, "transformer", None)).__name__ == "PixArtTransformer2DModel"
        self.model = pipe.transformer if self.pixart else pipe.unet
        self.device = self.model.device
        config = self.model.config
        self.cfg = setup.guidance > 1 and getattr(config, "time_cond_proj_dim", None) is None
        self.inputs = self.encode()
        pipe.scheduler.set_timesteps(setup.num_steps, device=self.device)
        self.timesteps = pipe.scheduler.timesteps
        size = config.sample_size * pipe.vae_scale_factor
        latents = pipe.prepare_latents(len(setup.prompts), config.in_channels, size, size,
                                       self.inputs["encoder_hidden_states"].dtype, self.device,
                                       generators(setup.seeds, self.device))
        self.start = (latents, copy.deepcopy(pipe.scheduler))

    def encode(self) -> dict:
        """The denoiser's text inputs for both CFG branches (unconditional first)."""
        pipe, prompts = self.setup.pipe, self.setup.prompts
        if not self.pixart:
            positive, negative = pipe.encode_prompt(prompts, self.device, 1, self.cfg)
            return {"encoder_hidden_states": torch.cat([negative, positive]) if self.cfg else positive}
        embeds, mask, negative, negative_mask = pipe.encode_prompt(prompts, self.cfg, device=self.device)
        if self.cfg:
            embeds, mask = torch.cat([negative, embeds]), torch.cat([negative_mask, mask])
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask,
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}

    def step(self, model, scheduler, latents, t):
        """One sampler step of `model` from `latents` at timestep `t`."""
        return denoise_step(model, scheduler, latents, t, self.setup.guidance, self.cfg, self.pixart, **self.inputs)

    @torch.no_grad()
    def images(self, latents) -> np.ndarray:
        """Decoded images (N, H, W, 3) float32 in [0, 1]."""
        vae = self.setup.pipe.vae
        images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
