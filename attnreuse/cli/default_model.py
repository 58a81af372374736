"""`attnreuse train-default` (reproduce a shipped model from its seed: the UNet model, or with `--arch dit` the
DiT model) and `attnreuse evaluate-default` (a card's measurements)."""

from __future__ import annotations

import json
from pathlib import Path

from ..cli.pipeline import default_device
from ..default_model import DEFAULT_MODELS, DEFAULT_OUT
from . import checks
from .checks import UsageError

__all__ = ["register", "run_train", "run_evaluate"]


def register(sub) -> None:
    train = sub.add_parser("train-default", help="train a default model from a seed (resumable)",
                           description="Reproduce a shipped default model: VAE, then UNet and text encoder; or with "
                                       "--arch dit a PixArt transformer and T5 text encoder beside the shipped VAE. "
                                       "Run the same command again to resume after an interruption.")
    train.add_argument("--arch", choices=tuple(DEFAULT_MODELS), default="unet",
                       help="denoiser family: unet (StableDiffusionPipeline) or dit (PixArtAlphaPipeline)")
    train.add_argument("--out", help="work folder (checkpoints/, model/) (default: runs/default, for --arch dit "
                                     "runs/default-dit)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--vae-steps", type=int, default=1500, help="(unet only; the DiT reuses the shipped VAE)")
    train.add_argument("--unet-steps", "--steps", dest="unet_steps", type=int, default=3000,
                       help="denoiser steps (UNet or DiT)")
    train.add_argument("--vae-batch", type=int, default=16)
    train.add_argument("--unet-batch", "--batch", dest="unet_batch", type=int, default=32, help="denoiser batch")
    train.add_argument("--unet-lr", "--lr", dest="unet_lr", type=float, default=5e-4, help="denoiser peak lr")
    train.add_argument("--unet-minutes", "--minutes", dest="unet_minutes", type=float,
                       help="train the denoiser for as many steps (at most --unet-steps) as fit this time; the count "
                            "is recorded in training.json")
    train.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    train.add_argument("--device", default=default_device())
    train.set_defaults(func=run_train)

    ev = sub.add_parser("evaluate-default", help="measure the default model for its card",
                        description="VAE PSNR on held-out images, faithfulness on held-out one- and two-shape "
                                    "captions (20-step DDIM), the time of `generate`; writes JSON and a PNG grid.")
    ev.add_argument("--model", help="model folder, or a shipped model's name: unet (the default) or dit")
    ev.add_argument("--count", type=int, default=100, help="held-out captions of each kind (one, two shapes)")
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--guidance", type=float)
    ev.add_argument("--out", default="runs/evaluate-default", help="folder for metrics.json and grid.png")
    ev.add_argument("--card", action="store_true", help="also write the model card (README.md) into the model")
    ev.add_argument("--sweep", help="comma-separated guidance scales to compare on the validation split first")
    ev.add_argument("--device", default=default_device())
    ev.set_defaults(func=run_evaluate)


def check_train(args) -> None:
    args.out = args.out or DEFAULT_OUT[args.arch]
    checks.device(args.device)
    for name in ("vae_steps", "unet_steps", "vae_batch", "unet_batch", "checkpoint_every"):
        checks.at_least(getattr(args, name), f"--{name.replace('_', '-')}", 1)
    checks.finite(args.unet_lr, "--unet-lr", above=0)
    checks.finite(args.unet_minutes, "--unet-minutes", above=0)
    checks.writable_dir(args.out, "--out")


def run_train(args) -> int:
    from ..default_model.train import train_default

    check_train(args)
    budget = None if args.unet_minutes is None else 60 * args.unet_minutes
    try:
        path = train_default(args.out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                             vae_batch=args.vae_batch, unet_batch=args.unet_batch, unet_lr=args.unet_lr,
                             device=args.device, checkpoint_every=args.checkpoint_every, unet_budget_s=budget,
                             arch=args.arch)
    except ValueError as err:  # a checkpoint for another setup, or damaged: named, with how to start over
        raise UsageError(str(err)) from None
    print(f"trained model written to {path}; evaluate it with `attnreuse evaluate-default --model {path}`")
    return 0


def check_evaluate(args) -> list[float]:
    """Every argument of `evaluate-default`; returns the guidance scales to sweep."""
    checks.device(args.device)
    if args.model in DEFAULT_MODELS:
        checks.shipped_model(args.model)
    if args.model is not None and args.model not in DEFAULT_MODELS:
        checks.model(args.model)
        if not (Path(args.model) / "model_index.json").is_file():
            raise UsageError(f"--model {args.model}: not a trained model folder (no model_index.json).")
    checks.at_least(args.count, "--count", 1)
    checks.at_least(args.steps, "--steps", 1)
    checks.finite(args.guidance, "--guidance", minimum=0)
    checks.writable_dir(args.out, "--out")
    try:
        sweep = [float(g) for g in args.sweep.split(",")] if args.sweep else []
    except ValueError:
        raise UsageError(f"--sweep {args.sweep!r}: a comma list of guidance scales.") from None
    for scale in sweep:
        checks.finite(scale, "--sweep", minimum=0)
    return sweep


def run_evaluate(args) -> int:
    from ..default_model.evaluate import evaluate_default

    sweep = check_evaluate(args)
    metrics = evaluate_default(args.model, count=args.count, steps=args.steps, guidance=args.guidance,
                               device=args.device, out=args.out, card=args.card, sweep=sweep)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("passed", "prompts")}
                      if isinstance(v, dict) else v for k, v in metrics.items()}, indent=1))
    return 0
