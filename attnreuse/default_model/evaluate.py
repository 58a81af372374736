"""The default model's measured figures: VAE reconstruction, prompt following with and without reuse, and the time
of `attnreuse generate`; what `attnreuse evaluate-default` prints and the model card quotes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..eval.images import image_grid, save_image
from ..files import write_json
from ..pipelines.sampling import GenerationSetup
from ..pipelines.timing import device_name
from ..plan import Schedule
from ..reuse import apply_attention_reuse
from ..search.utility import mean_psnr
from . import DEFAULT_GUIDANCE, default_model_dir, load_default_pipeline
from .faithfulness import pass_rates
from .splits import VALIDATION, held_out_captions
from .train import vae_psnr

__all__ = ["sweep_guidance", "evaluate_default"]

_KINDS = (("one_shape", False), ("two_shapes", True))


def sweep_guidance(pipe, scales, count: int = 50, steps: int = 20) -> dict:
    """Pass rates per guidance scale on the validation split, to choose the documented guidance scale without
    looking at the evaluation captions."""
    result = {}
    for scale in scales:
        rates = {}
        for kind, two in _KINDS:
            prompts = held_out_captions(count, two, seed=VALIDATION)
            images = GenerationSetup(pipe, prompts, num_steps=steps, guidance=scale).generate()
            rates[kind] = pass_rates(images, prompts)["pass_rate"]
        result[str(scale)] = rates
    return result


def _prompt_following(pipe, count: int, steps: int, guidance: float, reuse: int) -> tuple[dict, dict]:
    """Pass rates on the evaluation captions without and with HURRY reuse, and the images without reuse."""
    metrics, images = {}, {}
    for kind, two in _KINDS:
        prompts = held_out_captions(count, two)
        setup = GenerationSetup(pipe, prompts, num_steps=steps, guidance=guidance)
        images[kind] = setup.generate(progress=True)
        metrics[kind] = dict(pass_rates(images[kind], prompts), prompts=prompts)
        with apply_attention_reuse(pipe, Schedule.hurry(steps, reuse)):
            reused = setup.generate(progress=True)
        metrics[f"{kind}_hurry{reuse}"] = dict(pass_rates(reused, prompts),
                                               psnr_vs_full_db=mean_psnr(reused, images[kind]))
    return metrics, images


def _generate_seconds(device: str, out: Path) -> float:
    """Wall time of `attnreuse generate` in a fresh process, as a user runs it (first call included)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "attnreuse", "generate", "a red circle left of a blue square",
                    "--steps", "20", "--device", device, "-o", str(out / "generate.png")],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def evaluate_default(model: str | Path | None = None, count: int = 100, steps: int = 20,
                     guidance: float | None = None, device: str = "cpu", out: str | Path | None = None,
                     card: bool = False, reuse: int | None = None, sweep=()) -> dict:
    """A model card's figures (`model`: a folder, or a shipped model's name: "unet", the default, or "dit"): VAE
    PSNR on 500 held-out images, faithfulness on `count` one-shape and `count` two-shape evaluation captions (DDIM,
    `steps` steps, seeds 0..count-1) without and with HURRY reuse, and, for the shipped UNet model, the wall time of
    `attnreuse generate`. `sweep`: guidance scales to compare on the validation split first. Writes `metrics.json`
    and `grid.png` into `out`, and the card with `card`."""
    model_dir = default_model_dir(model)
    pipe = load_default_pipeline(model_dir, device)
    guidance = DEFAULT_GUIDANCE if guidance is None else guidance
    reuse = steps // 2 if reuse is None else reuse
    metrics = {"model": str(model_dir), "device": device_name(device), "steps": steps, "sampler": "ddim",
               "guidance": guidance, "vae_psnr_db": vae_psnr(pipe.vae, seed=0, count=500, device=device)}
    if sweep:
        metrics["guidance_sweep_validation"] = sweep_guidance(pipe, sweep, steps=steps)
    following, images = _prompt_following(pipe, count, steps, guidance, reuse)
    metrics.update(following)
    if out:
        out = Path(out)
        if model in (None, "unet"):  # `attnreuse generate` runs the shipped UNet model
            out.mkdir(parents=True, exist_ok=True)
            metrics["generate_s"] = _generate_seconds(device, out)
        write_json(out / "metrics.json", metrics)
        shown = np.concatenate([images["one_shape"][:16], images["two_shapes"][:16]])
        save_image(image_grid(shown, columns=8, upscale=3), out / "grid.png")
    if card:
        from .card import write_model_card

        write_model_card(model_dir, metrics)
    return metrics
