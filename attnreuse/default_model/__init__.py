"""The embedded default models: small text-to-image models of captioned shapes that ship with the package.

`weights/` is a plain diffusers `StableDiffusionPipeline` folder (a small `AutoencoderKL` for 64x64 images, a
`CLIPTextModel` trained from scratch with a word-level `CLIPTokenizer`, a `UNet2DConditionModel` with self- and
cross-attention at its 16x16 resolution, a DDIM scheduler config) with its model card. `weights_dit/`, once trained
(`attnreuse train-default --arch dit`), is a plain `PixArtAlphaPipeline` folder: the same VAE, a `T5EncoderModel`
trained from scratch with a word-level tokenizer, a `PixArtTransformer2DModel` on the same 16x16 latent. Beside
them: the data set (`shapes`), the prompt-following checker (`faithfulness`), the seeds of every split (`splits`),
the recipe (`config`, `train`) and the card's measurements (`evaluate`, `card`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL_DIR", "DEFAULT_DIT_DIR", "DEFAULT_MODELS", "DEFAULT_OUT", "DEFAULT_GUIDANCE",
           "default_model_dir", "load_default_pipeline"]

DEFAULT_MODEL_DIR = Path(__file__).parent / "weights"
DEFAULT_DIT_DIR = Path(__file__).parent / "weights_dit"
DEFAULT_MODELS = {"unet": DEFAULT_MODEL_DIR, "dit": DEFAULT_DIT_DIR}  # the shipped models by name
DEFAULT_GUIDANCE = 4.5  # chosen on the validation split (see the model card); the card's figures use it

DEFAULT_OUT = {"unet": "runs/default", "dit": "runs/default-dit"}  # train-default's work folders by default


def default_model_dir(model: str | Path | None = None) -> Path:
    """The folder of `model`: a shipped model's name ("unet", the default, or "dit"), or a folder's path."""
    if model is None:
        return DEFAULT_MODEL_DIR
    if isinstance(model, str) and model in DEFAULT_MODELS:
        return DEFAULT_MODELS[model]
    return Path(model)


def _missing(folder: Path) -> FileNotFoundError:
    """The error for a model folder that holds no model, with the command that makes one."""
    arch = next((name for name, shipped in DEFAULT_MODELS.items() if shipped == folder), None)
    if arch is not None:
        flag = " --arch dit" if arch == "dit" else ""
        how = (f"`attnreuse train-default{flag} --out {DEFAULT_OUT[arch]}` and copy {DEFAULT_OUT[arch]}/model to "
               f"{folder}")
    else:
        how = "`attnreuse train-default --out DIR` (--arch dit for the DiT model), which writes DIR/model"
    return FileNotFoundError(f"No trained model at {folder}: train one with {how}.")


@functools.cache
def _pixart_class():
    """`PixArtAlphaPipeline` with call defaults that suit a 64x64 model: diffusers' resolution binning knows only
    256 to 1024 px models (it raises "Invalid sample size" for a 16x16 latent), and caption cleaning (bs4, ftfy)
    has nothing to clean in the grammar's captions, on which the model was trained as they are. The same name, so
    that a pipeline saved from it is a plain `PixArtAlphaPipeline` folder."""
    from diffusers import PixArtAlphaPipeline as Plain

    class PixArtAlphaPipeline(Plain):
        def __call__(self, *args, use_resolution_binning: bool = False, clean_caption: bool = False, **kwargs):
            return super().__call__(*args, use_resolution_binning=use_resolution_binning,
                                    clean_caption=clean_caption, **kwargs)

    PixArtAlphaPipeline.__doc__ = _pixart_class.__doc__
    return PixArtAlphaPipeline


def load_default_pipeline(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """A shipped default model, or a trained folder at `path`: a `StableDiffusionPipeline` (the UNet model: `path`
    None or "unet") or a `PixArtAlphaPipeline` ("dit", or a folder of one; called with `use_resolution_binning`
    and `clean_caption` off by default, so that `pipe("a red circle")` draws a 64x64 image)."""
    from ..pipelines.sampling import quiet_image_processors

    folder = default_model_dir(path)
    if not (folder / "model_index.json").exists():
        raise _missing(folder)
    kind = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    with quiet_image_processors():  # importing a pipeline class imports its image processor
        from diffusers import StableDiffusionPipeline

        if kind == "PixArtAlphaPipeline":
            pipe = _pixart_class().from_pretrained(str(folder))
        else:
            pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
