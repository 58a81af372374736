"""Helpers the tools share: samplers, loading, device names, timing, seeded generation, PSNR, images, files.

One helper per concept, so that every tool times, seeds, scores and writes alike.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["SAMPLERS", "SD_SCHEDULER", "use_sampler", "load_pipeline", "device_name", "timed", "generators",
           "GenerationSetup", "generate", "to_uint8", "image_grid", "save_image", "PSNR_CAP", "psnr", "mean_psnr",
           "atomic_write", "write_json", "read_json", "parse_json_input", "write_clip_tokenizer", "write_t5_tokenizer",
           "denoise_step", "Sampling"]

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


def load_pipeline(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from a local folder or a hub id, on `device`, without a progress bar."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def device_name(device) -> str:
    """The card's or the CPU's name, recorded beside every timing."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU: {model} ({torch.get_num_threads()} threads)"


def timed(fn, device="cpu"):
    """Run `fn()` and return (result, seconds), synchronising CUDA around it."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


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


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] as uint8 (what a PNG holds)."""
    return np.clip(np.rint(np.asarray(images, dtype=np.float64) * 255), 0, 255).astype(np.uint8)


def image_grid(images, columns: int = 8, upscale: int = 2, pad: int = 2, labels=None):
    """A PIL image of (N, H, W, 3) images (float in [0, 1] or uint8) in rows of `columns`, enlarged `upscale`
    times (nearest); `labels` (one per row) are written left of the rows."""
    from PIL import Image, ImageDraw

    images = images if np.asarray(images).dtype == np.uint8 else to_uint8(images)
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
    grid = Image.fromarray(canvas)
    grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
    if not labels:
        return grid
    margin = 7 * max(len(label) for label in labels) + 8
    framed = Image.new("RGB", (grid.width + margin, grid.height), "white")
    framed.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(framed)
    for r, label in enumerate(labels[:rows]):
        draw.text((4, (pad + r * (h + pad) + h // 2) * upscale - 5), label, fill="black")
    return framed


def save_image(image, path) -> Path:
    """An image (PIL, or an (H, W, 3) array: float in [0, 1] or uint8) written atomically, in the format its file
    name says."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        image = Image.fromarray(array if array.dtype == np.uint8 else to_uint8(array))
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


PSNR_CAP = 100.0  # dB: an image identical to its reference counts as this, so that means stay finite


def psnr(image, reference, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between two images (arrays in [0, data_range]); inf when identical."""
    image, reference = np.asarray(image, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if image.shape != reference.shape:
        raise ValueError(f"PSNR needs images of one shape, got {image.shape} and {reference.shape}.")
    mse = float(np.mean((image - reference) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def mean_psnr(images, references) -> float:
    """The paper's utility: the mean over images of the PSNR (dB, each capped at PSNR_CAP) against references."""
    return float(np.mean([min(PSNR_CAP, psnr(x, y)) for x, y in zip(images, references, strict=True)]))


def atomic_write(path, write) -> Path:
    """`write(tmp)` writes a temporary file beside `path`, which is then renamed into place: an interruption or a
    write fault never leaves a half-written file at `path`. The folder is made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _finite(x):
    """JSON has no NaN or infinity: non-finite floats become null."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def write_json(path, data, indent: int | None = 1) -> Path:
    """`data` as JSON at `path`, written atomically, non-finite floats as null."""
    text = json.dumps(_finite(data), indent=indent, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path, what: str = "JSON file"):
    """The JSON at `path`; a missing, unreadable or malformed file is a ValueError that names it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from None


def parse_json_input(data, what: str, parse, inline: tuple[str, ...] = ("{",)):
    """`parse` applied to a JSON string, dict or file (a string not starting with one of `inline` is a path); its
    TypeError or ValueError, and a malformed JSON, name the file or say "`what` JSON"."""
    where = f"{what} JSON"
    if isinstance(data, Path) or (isinstance(data, str) and not data.lstrip().startswith(inline)):
        where, data = f"{what} file {data}", read_json(data, f"{what} file")
    elif isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON: {err}") from None
    try:
        return parse(data)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None


def _bpe_merges(words) -> tuple[list[tuple[str, str]], list[str]]:
    """Byte-pair merges learnt on the word list until every word is one token, and the resulting symbols: CLIP's
    tokenizer splits a word into characters and applies merges by rank."""
    from collections import Counter

    segments = {w: [*w[:-1], w[-1] + "</w>"] for w in dict.fromkeys(words)}
    symbols = list(dict.fromkeys(sym for seg in segments.values() for sym in seg))
    merges = []
    while any(len(seg) > 1 for seg in segments.values()):
        pairs = Counter(pair for seg in segments.values() for pair in zip(seg, seg[1:]))
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        symbols.append("".join(best))
        segments = {word: _merged(seg, best) for word, seg in segments.items()}
    return merges, list(dict.fromkeys(symbols))


def _merged(seg: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(seg):
        if i + 1 < len(seg) and (seg[i], seg[i + 1]) == pair:
            out.append(seg[i] + seg[i + 1])
            i += 2
        else:
            out.append(seg[i])
            i += 1
    return out


def write_clip_tokenizer(directory, words, max_length: int = 77):
    """Write a word-level CLIP tokenizer (vocab.json and the merges.txt that makes each word one token), load it."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = [w.lower() for w in words]
    merges, symbols = _bpe_merges(words)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    atomic_write(directory / "vocab.json", lambda tmp: tmp.write_text(json.dumps(vocab)))
    atomic_write(directory / "merges.txt", lambda tmp: tmp.write_text(merges_text))
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                              model_max_length=max_length, pad_token="<|endoftext|>")
    broken = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if broken:
        raise RuntimeError(f"attnreuse: the written tokenizer splits {broken[:5]}; this is a bug.")
    return tokenizer


def write_t5_tokenizer(directory, words, max_length: int = 120):
    """Write a word-level tokenizer with T5's special tokens (pad 0, eos 1, unk 2; eos appended), save and return it:
    what T5-conditioned pipelines (PixArt, SD3, Flux) call, made locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=max_length)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


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
        self.inputs = self._encode()
        pipe.scheduler.set_timesteps(setup.num_steps, device=self.device)
        self.timesteps = pipe.scheduler.timesteps
        size = config.sample_size * pipe.vae_scale_factor
        latents = pipe.prepare_latents(len(setup.prompts), config.in_channels, size, size,
                                       self.inputs["encoder_hidden_states"].dtype, self.device,
                                       generators(setup.seeds, self.device))
        self.start = (latents, copy.deepcopy(pipe.scheduler))

    def _encode(self) -> dict:
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
