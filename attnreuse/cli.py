"""The `attnreuse` command line. Sub-commands: `speed` (more come with later issues)."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _speed(args) -> int:
    """Generate with and without reuse, interleaved in one process, and print medians, ratio and PSNR."""
    import torch
    from tqdm.auto import tqdm

    from . import apply_attention_reuse
    from .metrics import psnr
    from .sampling import device_name, load_pipeline, median, timed, use_sampler
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
