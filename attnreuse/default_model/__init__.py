"""The embedded default model: a small text-to-image model of captioned shapes that ships with the package.

`weights/` is a plain diffusers `StableDiffusionPipeline` folder (a small `AutoencoderKL` for 64x64 images, a
`CLIPTextModel` trained from scratch with a word-level `CLIPTokenizer`, a `UNet2DConditionModel` with self- and
cross-attention at its 16x16 resolution, a DDIM scheduler config) with its model card. Beside it: the data set
(`shapes`), the prompt-following checker (`faithfulness`), the seeds of every split (`splits`), the recipe
(`config`, `train`) and the card's measurements (`evaluate`, `card`).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL_DIR", "DEFAULT_GUIDANCE", "load_default_pipeline"]

DEFAULT_MODEL_DIR = Path(__file__).parent / "weights"
DEFAULT_GUIDANCE = 4.5  # chosen on the validation split (see the model card); the card's figures use it


def load_default_pipeline(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """The shipped default model (or a trained folder at `path`) as a `StableDiffusionPipeline`."""
    from diffusers import StableDiffusionPipeline

    path = Path(path) if path else DEFAULT_MODEL_DIR
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"No trained model at {path}: train one with `attnreuse train-default --out {path}`.")
    pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
