"""What the commands share: the model options, loading the pipeline they name, and their prompts."""

from __future__ import annotations

import argparse

import torch

from ..default_model import DEFAULT_GUIDANCE, load_default_pipeline
from ..default_model.splits import captions
from ..pipelines.sampling import SAMPLERS, load_pipeline, use_sampler
from ..pipelines.tiny import ARCHS, build_pipeline
from . import checks
from .checks import UsageError

__all__ = ["shipped", "default_device", "add_model_options", "check_model_options", "load_model", "pipeline", "prompts"]


def shipped(model: str | None) -> bool:
    """A shipped default model: None (the UNet one) or "dit"; their captions need no prompt file."""
    return model is None or model == "dit"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every model-running command shares."""
    parser.add_argument("--model", help="diffusers model path or hub id, or a local architecture with random weights "
                                        f"({', '.join(ARCHS)}), or dit (the shipped DiT default model) "
                                        "(default: the shipped default model)")
    parser.add_argument("--prompts", help="file with one prompt per line (default: captions of the shapes grammar)")
    parser.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the model card's, 7.5 elsewhere)")
    parser.add_argument("--device", default=default_device())
    return parser


def check_model_options(args, prompts_needed: int = 0) -> None:
    """The shared options: a model and device this machine can use, steps, guidance, and a prompt file with enough
    lines (or the shipped model, whose captions need none)."""
    checks.model(args.model)
    checks.device(args.device)
    checks.at_least(args.steps, "--steps", 1)
    checks.finite(args.guidance, "--guidance", minimum=0)
    if args.prompts:
        checks.prompt_lines(args.prompts, prompts_needed)
    elif not shipped(args.model) and prompts_needed:
        raise UsageError("A model other than the default one needs --prompts FILE (one prompt per line).")


def load_model(model: str | None, device: str, dtype: torch.dtype = torch.float32):
    """The shipped default model (None), a local architecture with random weights, or a diffusers path / hub id."""
    if shipped(model):
        return load_default_pipeline(model, device=device)
    if model in ARCHS:
        return build_pipeline(model, dtype=dtype, device=device)
    try:
        return load_pipeline(model, device, dtype)
    except (OSError, ValueError) as err:  # not found, offline, not a pipeline: what the user named cannot load
        raise UsageError(f"--model {model} cannot be loaded: {err}") from None


def pipeline(args):
    """The pipeline of `--model` with `--sampler`, and the guidance scale: `--guidance`, else the default model's
    documented scale, else 7.5. A flow-matching pipeline (SD3, Flux, Wan) keeps its own scheduler: the samplers
    by name are discrete-time ones, which its call cannot drive (it passes sigmas)."""
    pipe = load_model(args.model, args.device)
    if "FlowMatch" in type(pipe.scheduler).__name__:
        if args.sampler != "ddim":  # the default, which leaves such a pipeline's own scheduler in place
            raise UsageError(f"--sampler {args.sampler}: {args.model} samples by flow matching "
                             f"({type(pipe.scheduler).__name__}); leave --sampler out to use it.")
    else:
        pipe = use_sampler(pipe, args.sampler)
    guidance = args.guidance if args.guidance is not None else DEFAULT_GUIDANCE if shipped(args.model) else 7.5
    return pipe, guidance


def prompts(args, count: int, seed: int, skip: int = 0) -> list[str]:
    """`--prompts FILE` (one per line, from line `skip` on), else `count` captions of the shapes grammar from the
    default model's split of `seed` (half with two shapes); image i gets seed i."""
    if args.prompts:
        return checks.prompt_lines(args.prompts, 0)[skip:skip + count]
    if shipped(args.model):
        return captions(count, seed)
    raise UsageError("A model other than the default one needs --prompts FILE (one prompt per line).")
