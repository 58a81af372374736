"""The `attnreuse` command line: `generate`, `speed`, `train-default`, `evaluate-default`."""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # for the "total" that `generate` prints (interpreter start-up not included)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

__all__ = ["main"]


def _speed(args) -> int:
    """Generate with and without reuse, interleaved in one process, and print medians, ratio and PSNR."""
    import torch
    from tqdm.auto import tqdm

    from . import apply_attention_reuse
    from .metrics import psnr
    from statistics import median

    from .sampling import device_name, load_pipeline, timed, use_sampler
    from .schedule import Schedule, as_schedule

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = use_sampler(load_pipeline(args.model, args.device, dtype), args.sampler)
    schedule = as_schedule(args.schedule) if args.schedule else Schedule.hurry(args.steps, args.reuse)
    size = args.size or getattr(pipe.unet.config, "sample_size", 64) * getattr(pipe, "vae_scale_factor", 8)
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=size, width=size,
                  output_type="np")

    def generate():
        generator = torch.Generator(args.device).manual_seed(args.seed)
        return pipe(args.prompt, generator=generator, **kwargs).images

    handle = apply_attention_reuse(pipe, schedule)
    handle.remove()  # validate the schedule against the model before timing anything
    times = {"full": [], "reuse": []}
    images = {}
    for i in tqdm(range(args.repeats + 1), desc="speed (first round is warm-up)", disable=args.quiet):
        for mode in ("full", "reuse"):
            handle = apply_attention_reuse(pipe, schedule) if mode == "reuse" else None
            images[mode], seconds = timed(generate, args.device)
            if handle is not None:
                peak = handle.stats()["peak_cache_bytes"]
                handle.remove()
            if i > 0:
                times[mode].append(seconds)
    full, reuse = median(times["full"]), median(times["reuse"])
    result = {
        "model": args.model, "device": device_name(args.device), "dtype": args.dtype, "sampler": args.sampler,
        "steps": args.steps, "schedule": str(schedule), "size": size, "guidance": args.guidance,
        "repeats": args.repeats, "full_s": full, "reuse_s": reuse, "speedup": full / reuse,
        "psnr_db": psnr(images["reuse"], images["full"]), "peak_cache_mib": peak / 2**20,
        "full_times_s": times["full"], "reuse_times_s": times["reuse"],
    }
    print(f"{result['device']}, {args.model}, {args.sampler} {args.steps} steps, {size}x{size}, {args.dtype}")
    print(f"schedule {schedule} ({schedule.num_reuse} reuse steps), median of {args.repeats} interleaved runs:")
    print(f"  no reuse   {full:8.3f} s")
    print(f"  reuse      {reuse:8.3f} s   speed-up {result['speedup']:.2f}x   "
          f"PSNR vs no reuse {result['psnr_db']:.1f} dB   peak map cache {result['peak_cache_mib']:.1f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _generate(args) -> int:
    """One prompt with and without reuse on the default model (or any diffusers model); times both."""
    import torch

    from . import apply_attention_reuse
    from .default_model import DEFAULT_GUIDANCE, load_default_pipeline
    from .metrics import psnr
    from .sampling import load_pipeline, timed, use_sampler
    from .schedule import as_schedule

    schedule = as_schedule(args.schedule or f"hurry:{args.steps // 2}", num_steps=args.steps)  # fail fast
    pipe = load_default_pipeline(device=args.device) if args.model is None else load_pipeline(args.model, args.device)
    use_sampler(pipe, args.sampler)
    guidance = DEFAULT_GUIDANCE if args.guidance is None and args.model is None else (args.guidance or 7.5)
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=guidance, output_type="pil")
    if args.size:
        kwargs.update(height=args.size, width=args.size)

    def run():
        return pipe(args.prompt, generator=torch.Generator(args.device).manual_seed(args.seed), **kwargs).images[0]

    full, full_s = timed(run, args.device)
    with apply_attention_reuse(pipe, schedule):
        image, reuse_s = timed(run, args.device)
    out = args.output
    image.save(out)
    full_path = out.rsplit(".", 1)[0] + ".full.png"
    full.save(full_path)
    print(f"{args.prompt!r}: {args.sampler} {args.steps} steps, guidance {guidance}, seed {args.seed}")
    print(f"  no reuse {full_s:.3f} s -> {full_path}")
    print(f"  reuse    {reuse_s:.3f} s -> {out}   schedule {schedule} ({schedule.num_reuse} reuse), "
          f"{full_s / reuse_s:.2f}x, PSNR vs no reuse {psnr(np.asarray(image) / 255, np.asarray(full) / 255):.1f} dB")
    if args.model is None:
        from .faithfulness import check

        try:
            verdict = {k: v for k, v in check(np.asarray(image), args.prompt).items() if k != "objects"}
            print(f"  faithfulness check of the reuse image: {verdict}")
        except ValueError:
            pass  # a prompt outside the shapes grammar: nothing to check
    print(f"  total {time.perf_counter() - _STARTED:.1f} s (imports, loading and both generations)")
    return 0


def _train_default(args) -> int:
    from .train import train_default

    path = train_default(args.out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                         vae_batch=args.vae_batch, unet_batch=args.unet_batch, device=args.device)
    print(f"trained model written to {path}; evaluate it with `attnreuse evaluate-default --model {path}`")
    return 0


def _evaluate_default(args) -> int:
    from .default_model import evaluate_default

    sweep = [float(g) for g in args.sweep.split(",")] if args.sweep else ()
    metrics = evaluate_default(args.model, count=args.count, steps=args.steps, guidance=args.guidance,
                               device=args.device, out=args.out, card=args.card, sweep=sweep)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("passed", "prompts")}
                      if isinstance(v, dict) else v for k, v in metrics.items()}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .local import ARCHS
    from .sampling import SAMPLERS

    parser = argparse.ArgumentParser(
        prog="attnreuse", description="Faster diffusion sampling by reusing attention maps across denoising steps.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    speed = sub.add_parser(
        "speed", help="time generation with and without attention reuse, side by side",
        description="Time one prompt with and without reuse in one process (interleaved, after a warm-up round) "
                    "and report the speed-up and the PSNR of the reuse image against the no-reuse image.")
    speed.add_argument("--model", default="small-sd",
                       help=f"local architecture with random weights ({', '.join(ARCHS)}) or a diffusers "
                            "path / hub id (default: small-sd)")
    speed.add_argument("--prompt", default="a red circle left of a blue square")
    speed.add_argument("--steps", type=int, default=20)
    speed.add_argument("--reuse", type=int, default=10, help="HURRY reuse steps (ignored with --schedule)")
    speed.add_argument("--schedule", help="bit string like 1110100, hurry:N:R, or a schedule JSON file")
    speed.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    speed.add_argument("--guidance", type=float, default=7.5)
    speed.add_argument("--size", type=int, help="image size in pixels (default: the model's)")
    speed.add_argument("--seed", type=int, default=0)
    speed.add_argument("--repeats", type=int, default=3)
    speed.add_argument("--device", default="cuda" if _cuda() else "cpu")
    speed.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    speed.add_argument("--json", help="also write the figures to this JSON file")
    speed.add_argument("--quiet", action="store_true", help="no progress bar")
    speed.set_defaults(func=_speed)

    device = "cuda" if _cuda() else "cpu"
    gen = sub.add_parser("generate", help="generate one image with and without reuse (default model by default)",
                         description="Generate PROMPT with and without attention reuse and print both times. "
                                     "Without --model it runs the shipped default model (captioned shapes).")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="a diffusers model path or hub id, or a local architecture (default: the "
                                     "shipped default model)")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--schedule", help="hurry:R (reuse the last R steps; default R = steps/2), hurry:N:R, "
                                        "a bit string, or a schedule JSON file")
    gen.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    gen.add_argument("--guidance", type=float, help="guidance scale (default: the model card's, 7.5 elsewhere)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", type=int, help="image size in pixels (default: the model's)")
    gen.add_argument("-o", "--output", default="out.png", help="the reuse image; the no-reuse one goes beside "
                                                              "it as NAME.full.png")
    gen.add_argument("--device", default=device)
    gen.set_defaults(func=_generate)

    train = sub.add_parser("train-default", help="train the default model from a seed (resumable)",
                           description="Reproduce the shipped default model: VAE, then UNet and text encoder. "
                                       "Run the same command again to resume after an interruption.")
    train.add_argument("--out", default="runs/default", help="work folder (checkpoints/, model/)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--vae-steps", type=int, default=1500)
    train.add_argument("--unet-steps", type=int, default=3000)
    train.add_argument("--vae-batch", type=int, default=16)
    train.add_argument("--unet-batch", type=int, default=32)
    train.add_argument("--device", default=device)
    train.set_defaults(func=_train_default)

    ev = sub.add_parser("evaluate-default", help="measure the default model against the model card's bars",
                        description="VAE PSNR on held-out images, faithfulness on held-out one- and two-shape "
                                    "captions (20-step DDIM), the time of `generate`; writes JSON and a PNG grid.")
    ev.add_argument("--model", help="model folder (default: the shipped one)")
    ev.add_argument("--count", type=int, default=100, help="held-out captions of each kind (one, two shapes)")
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--guidance", type=float)
    ev.add_argument("--out", default="runs/evaluate-default", help="folder for metrics.json and grid.png")
    ev.add_argument("--card", action="store_true", help="also write the model card (README.md) into the model")
    ev.add_argument("--sweep", help="comma-separated guidance scales to compare on a validation split first")
    ev.add_argument("--device", default=device)
    ev.set_defaults(func=_evaluate_default)
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"attnreuse: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
