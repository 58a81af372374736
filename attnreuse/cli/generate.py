"""`attnreuse generate` (one prompt with and without reuse) and `attnreuse speed` (timing them side by side)."""

from __future__ import annotations

import time
from statistics import median

import torch
from tqdm.auto import tqdm

from ..cli.pipeline import default_device, load_model, pipeline, shipped
from ..eval.images import save_image
from ..files import write_json, written_together
from ..layers import denoiser
from ..pipelines.sampling import SAMPLERS, generators, use_sampler
from ..pipelines.timing import device_name, timed
from ..plan import Schedule
from ..plan_cache import weights_fingerprint
from ..reuse import apply_reuse
from ..search.utility import psnr
from . import checks
from .checks import UsageError

__all__ = ["register", "run_generate", "run_speed"]

_PROMPT = "a red circle left of a blue square"


def register(sub) -> None:
    gen = sub.add_parser("generate", help="generate one image with and without reuse (default model by default)",
                         description="Generate PROMPT with and without attention reuse and print both times. "
                                     "Without --model it runs the shipped default model (captioned shapes).")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="a diffusers model path or hub id, or a local architecture (default: the "
                                     "shipped default model)")
    gen.add_argument("--steps", type=int, default=20)
    what = gen.add_mutually_exclusive_group()
    what.add_argument("--plan", help="a plan JSON (attnreuse plan --out); default: the shipped plan for a budget of "
                                     "0.5 on the default model, HURRY with half the steps reused elsewhere")
    what.add_argument("--budget", type=float, help="latency as a fraction of the full sampler's: the default model's "
                                                   "shipped plan for it (0.35, 0.5, 0.7, 0.85), else a plan made at "
                                                   "first use (the warm-up round calibrates; kept in the plan cache)")
    what.add_argument("--schedule", help="the paper's attention reuse: hurry:R (reuse the last R steps), hurry:N:R, "
                                         "a bit string, or a schedule JSON file")
    gen.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    gen.add_argument("--guidance", type=float, help="guidance scale (default: the model card's, 7.5 elsewhere)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", type=int, help="image size in pixels (default: the model's)")
    gen.add_argument("-o", "--output", default="out.png", help="the reuse image; the no-reuse one goes beside "
                                                              "it as NAME.full.png")
    gen.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating, after a warm-up")
    gen.add_argument("--device", default=default_device())
    gen.set_defaults(func=run_generate)

    speed = sub.add_parser(
        "speed", help="time generation with and without attention reuse, side by side",
        description="Time one prompt with and without reuse in one process (interleaved, after a warm-up round) "
                    "and report the speed-up and the PSNR of the reuse image against the no-reuse image.")
    speed.add_argument("--model", default="small-sd", help="local architecture with random weights or a diffusers "
                                                           "path / hub id (default: small-sd)")
    speed.add_argument("--prompt", default=_PROMPT)
    speed.add_argument("--steps", type=int, default=20)
    speed.add_argument("--reuse", type=int, default=10, help="HURRY reuse steps (ignored with --schedule)")
    speed.add_argument("--schedule", help="bit string like 1110100, hurry:N:R, or a schedule JSON file")
    speed.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    speed.add_argument("--guidance", type=float, default=7.5)
    speed.add_argument("--size", type=int, help="image size in pixels (default: the model's)")
    speed.add_argument("--seed", type=int, default=0)
    speed.add_argument("--repeats", type=int, default=3)
    speed.add_argument("--device", default=default_device())
    speed.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    speed.add_argument("--json", help="also write the figures to this JSON file")
    speed.add_argument("--quiet", action="store_true", help="no progress bar")
    speed.set_defaults(func=run_speed)


def _check_common(args) -> None:
    checks.model(args.model)
    checks.device(args.device)
    checks.at_least(args.steps, "--steps", 1)
    checks.finite(args.guidance, "--guidance", minimum=0)
    checks.image_size(args.size)
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be a whole number from 0 to 2**63 - 1, got {args.seed}.")


def check_generate(args):
    """Every argument of `generate`, before the model loads; returns the plan or schedule to run."""
    if not args.prompt.strip():
        raise UsageError("the prompt is empty.")
    _check_common(args)
    checks.at_least(args.repeats, "--repeats", 1)
    checks.writable_file(args.output, "-o/--output", checks.IMAGE_SUFFIXES)
    if args.schedule or (args.model is not None and args.plan is None and args.budget is None):
        return checks.schedule(args.schedule or f"hurry:{args.steps // 2}", args.steps, args.sampler)
    if args.budget is not None:
        if not 0 < args.budget <= 1:
            raise UsageError(f"--budget must be a fraction of the full sampler's latency, above 0 and at most 1; "
                             f"got {args.budget:g}.")
        shipped_file = _shipped(args.model, args.sampler, args.steps, args.budget)
        return {"budget": args.budget} if shipped_file is None else checks.plan(shipped_file, args.steps, args.sampler)
    return checks.plan(args.plan or _shipped(None, args.sampler, 20, 0.5), args.steps, args.sampler)


def _shipped(model, sampler: str, steps: int, budget: float) -> str | None:
    """The default model's shipped plan for this sampler, step count and budget (None: there is none)."""
    from ..search import shipped_plan

    if model is not None:
        return None
    try:
        return str(shipped_plan("dpm++" if sampler == "dpm++" else "ddim", budget, steps))
    except FileNotFoundError:
        return None


def run_generate(args) -> int:
    """One prompt with and without reuse on the default model (or any diffusers model): a warm-up of each, then
    alternating timed runs; the median times, their ratio and the PSNR between the images."""
    reuse = check_generate(args)
    pipe, guidance = pipeline(args)
    _check_against(reuse, pipe, args)
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=guidance, output_type="np")
    if args.size:
        kwargs.update(height=args.size, width=args.size)

    def run():
        return pipe(args.prompt, generator=generators([args.seed], args.device)[0], **kwargs).images[0]

    times, images, ran = {"full": [], "reuse": []}, {}, None
    for _ in range(args.repeats + 1):  # the first round warms up both
        images["full"], seconds = timed(run, args.device)
        times["full"].append(seconds)
        with (apply_reuse(pipe, **reuse) if isinstance(reuse, dict) else apply_reuse(pipe, reuse)) as handle:
            images["reuse"], seconds = timed(run, args.device)
            ran = handle.stats()
        times["reuse"].append(seconds)
    full_s, reuse_s = median(times["full"][1:]), median(times["reuse"][1:])
    full_path = args.output.rsplit(".", 1)[0] + ".full.png"
    with written_together():  # the two images of one prompt, never one of them from an earlier run
        save_image(images["reuse"], args.output)
        save_image(images["full"], full_path)
    print(f"{args.prompt!r}: {args.sampler} {args.steps} steps, guidance {guidance}, seed {args.seed}; "
          f"{device_name(args.device)}, median of {args.repeats} alternating runs after a warm-up")
    print(f"  no reuse {full_s:.3f} s -> {full_path}")
    print(f"  reuse    {reuse_s:.3f} s -> {args.output}   {full_s / reuse_s:.2f}x faster, PSNR vs no reuse "
          f"{psnr(images['reuse'], images['full']):.1f} dB")
    print(f"  {_described(reuse, ran)}")
    if shipped(args.model):
        _check_faithfulness(images["reuse"], args.prompt)
    print(f"  total {time.perf_counter() - args.started:.1f} s (imports, loading and all generations)")
    return 0


def _check_against(reuse, pipe, args) -> None:
    """The plan or schedule placed on this pipeline before anything is generated: one made for other weights (its
    meta's fingerprint) or naming layers this model lacks is refused in one line."""
    if isinstance(reuse, dict):
        return  # planned at first use, for this pipeline
    what = f"--plan {args.plan}" if args.plan else f"--schedule {args.schedule}" if args.schedule else "the plan"
    made_for = reuse.meta.get("weights")
    if made_for is not None and made_for != weights_fingerprint(denoiser(pipe)):
        raise UsageError(f"{what} was made for other weights than this model's (its meta's fingerprint differs); "
                         "plan this model with `attnreuse plan`, or use --budget to plan it at first use.")
    try:
        apply_reuse(pipe, reuse).remove()
    except (ValueError, TypeError) as err:
        raise UsageError(f"{what}: {err}") from None


def _described(reuse, ran: dict) -> str:
    """What ran: a schedule's bits (moved by timestep where it was made for another step count), or a plan, and
    for a plan made at first use where it came from."""
    if isinstance(reuse, dict):
        return (f"plan for a budget of {reuse['budget']:g} made at first use: {ran['plan']} (predicted latency "
                f"{ran.get('predicted_latency', float('nan')):.3f}x; {ran['plan_source']})")
    if isinstance(reuse, Schedule):
        bits = Schedule(ran["schedule"])
        moved = f", moved from {reuse}" if bits != reuse else ""
        return f"schedule {bits} ({bits.num_reuse} reuse{moved})"
    budget = reuse.meta.get("budget")
    moved = f", moved from {reuse} by timestep" if ran["plan"] != str(reuse) else ""
    return f"plan{f' for a budget of {budget:g}' if budget else ''}: {ran['plan']}{moved}"


def _check_faithfulness(image, prompt: str) -> None:
    from ..default_model.faithfulness import check

    try:
        verdict = {k: v for k, v in check(image, prompt).items() if k != "objects"}
    except ValueError:
        return  # a prompt outside the shapes grammar: nothing to check
    print(f"  faithfulness check of the reuse image: {verdict}")


def check_speed(args) -> Schedule:
    """Every argument of `speed`, before the model loads; returns the schedule."""
    _check_common(args)
    checks.at_least(args.repeats, "--repeats", 1)
    if args.json:
        checks.writable_file(args.json, "--json", (".json",))
    return checks.schedule(args.schedule or f"hurry:{args.steps}:{args.reuse}", args.steps, args.sampler)


def run_speed(args) -> int:
    """Generate with and without reuse, interleaved in one process, and print medians, ratio and PSNR."""
    schedule = check_speed(args)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = use_sampler(load_model(args.model, args.device, dtype), args.sampler)
    size = args.size or getattr(denoiser(pipe).config, "sample_size", 64) * getattr(pipe, "vae_scale_factor", 8)
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=size, width=size,
                  output_type="np")

    def generate():
        return pipe(args.prompt, generator=generators([args.seed], args.device)[0], **kwargs).images

    apply_reuse(pipe, schedule).remove()  # the schedule against the model's layers, before timing
    times, images, peak = {"full": [], "reuse": []}, {}, 0
    for i in tqdm(range(args.repeats + 1), desc="speed (first round is warm-up)", disable=args.quiet):
        for mode in ("full", "reuse"):
            handle = apply_reuse(pipe, schedule) if mode == "reuse" else None
            images[mode], seconds = timed(generate, args.device)
            if handle is not None:
                peak, ran = handle.stats()["peak_cache_bytes"], Schedule(handle.stats()["schedule"])
                handle.remove()
            if i > 0:
                times[mode].append(seconds)
    full, reuse = median(times["full"]), median(times["reuse"])
    result = {"model": args.model, "device": device_name(args.device), "dtype": args.dtype, "sampler": args.sampler,
              "steps": args.steps, "schedule": str(ran), "size": size, "guidance": args.guidance,
              "repeats": args.repeats, "full_s": full, "reuse_s": reuse, "speedup": full / reuse,
              "psnr_db": psnr(images["reuse"], images["full"]), "peak_cache_mib": peak / 2**20,
              "full_times_s": times["full"], "reuse_times_s": times["reuse"]}
    print(f"{result['device']}, {args.model}, {args.sampler} {args.steps} steps, {size}x{size}, {args.dtype}")
    print(f"schedule {ran} ({ran.num_reuse} reuse steps), median of {args.repeats} interleaved runs:")
    print(f"  no reuse   {full:8.3f} s")
    print(f"  reuse      {reuse:8.3f} s   speed-up {result['speedup']:.2f}x   "
          f"PSNR vs no reuse {result['psnr_db']:.1f} dB   peak map cache {result['peak_cache_mib']:.1f} MiB")
    if args.json:
        write_json(args.json, result, indent=2)
    return 0



