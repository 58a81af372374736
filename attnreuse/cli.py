"""The `attnreuse` command line: `generate`, `speed`, `search`, `compare`, `analyze`, `train-default`,
`evaluate-default`."""

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


def _pipeline(args):
    """The pipeline of `--model` (the shipped default model when absent) with `--sampler`, and the guidance scale:
    `--guidance`, else the default model's documented scale, else 7.5."""
    from .default_model import DEFAULT_GUIDANCE, load_default_pipeline
    from .sampling import load_pipeline, use_sampler

    pipe = load_default_pipeline(device=args.device) if args.model is None else load_pipeline(args.model, args.device)
    use_sampler(pipe, args.sampler)
    guidance = args.guidance if args.guidance is not None else DEFAULT_GUIDANCE if args.model is None else 7.5
    return pipe, guidance


def _prompts(args, count: int, seed: int, skip: int = 0) -> tuple[list[str], list[int]]:
    """`--prompts FILE` (one per line, from line `skip` on), else `count` captions of the shapes grammar (half with
    two shapes) drawn from data set items of `seed`; image i gets seed i."""
    from .evaluation import held_out_captions

    if args.prompts:
        with open(args.prompts) as f:
            prompts = [line.strip() for line in f if line.strip()][skip:skip + count]
    elif args.model is None:
        prompts = held_out_captions(count - count // 2, False, seed) + held_out_captions(count // 2, True, seed)
    else:
        raise ValueError("A model other than the default one needs --prompts FILE (one prompt per line).")
    return prompts, list(range(len(prompts)))


def _search(args) -> int:
    """PHAST (or exhaustive) search on a calibration set; writes the schedule JSON and a summary."""
    from pathlib import Path

    from .search import search_schedule

    pipe, guidance = _pipeline(args)
    prompts, seeds = _prompts(args, args.calibration, seed=3)  # seed 3: never the held-out or validation captions
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = Path(args.state) if args.state else out.with_suffix(".state.json")
    schedule = search_schedule(pipe, prompts, seeds, args.steps, args.reuse, guidance, args.epsilon, args.exhaustive,
                               state, progress=True, model=args.model or "attnreuse default model",
                               sampler=args.sampler, calibration_seed=3)
    schedule.to_json(out, indent=1)
    m = schedule.meta
    print(f"{m.get('strategy')} schedule {schedule}: "
          f"{m['psnr_db']:.2f} dB mean PSNR vs no reuse on {len(prompts)} calibration images "
          f"(HURRY {m['hurry_psnr_db']:.2f} dB); "
          f"{m['evaluations']} schedules, {m['model_calls']} denoiser calls with shared prefixes vs "
          f"{m['naive_model_calls']} for full runs ({m['naive_model_calls'] / max(1, m['model_calls']):.1f}x fewer) "
          f"-> {out}")
    return 0


def _compare(args) -> int:
    """Mean PSNR vs no reuse of named schedules on held-out prompts and seeds; JSON + markdown table."""
    from pathlib import Path

    from .search import Evaluator, named_schedules

    pipe, guidance = _pipeline(args)
    prompts, seeds = _prompts(args, args.count, seed=0)
    evaluator = Evaluator(pipe, prompts, seeds, args.steps, guidance, progress=True)
    rows = []
    for name, schedule in named_schedules(args.schedules.split(","), args.steps, args.reuse, evaluator.timesteps):
        rows.append({"strategy": name, "schedule": "".join(map(str, schedule.bits)),
                     "reuse_steps": schedule.num_reuse, "psnr_db": evaluator([schedule])[0]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model or "attnreuse default model", "sampler": args.sampler, "steps": args.steps,
              "guidance": guidance, "prompts": prompts, "seeds": seeds, "rows": rows,
              "model_calls": evaluator.calls, "naive_model_calls": evaluator.naive_calls}
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    table = ["| strategy | schedule (1 = compute) | reuse steps | mean PSNR vs no reuse (dB) |", "|---|---|---|---|"]
    table += [f"| {r['strategy']} | `{r['schedule']}` | {r['reuse_steps']} | {r['psnr_db']:.2f} |" for r in rows]
    (out / "compare.md").write_text("\n".join(table) + "\n")
    print(f"{args.sampler} {args.steps} steps, guidance {guidance}, {len(prompts)} held-out prompts x seeds:")
    print("\n".join(table))
    return 0


def _eval(args) -> int:
    """Every method on the same prompts and seeds against `full`; JSON, markdown, Pareto plot and grid."""
    from .evaluation import PRESETS, merge_runs, run_methods, summarize, write_report
    from .metrics import load_extra_metrics

    from accelerate import PartialState
    from accelerate.utils import gather_object

    extra = load_extra_metrics(args.clip_model, args.lpips, args.fid)  # a missing weights file stops it here

    # One process unless started by `accelerate launch` (or torchrun): then the prompts are split between them.
    state = PartialState(cpu=args.device == "cpu")
    if state.num_processes > 1 and args.device != "cpu":
        args.device = str(state.device)
    pipe, guidance = _pipeline(args)
    prompts, seeds = _prompts(args, args.count, seed=0)
    methods = [m for item in args.methods.split(",") for m in PRESETS.get(item, item).split(",")]
    # phast:R searches on what `attnreuse search` calibrates on (captions of seed 3, or the prompt file's lines
    # after the evaluated ones), less any prompt evaluated here
    calibration = [p for p in _prompts(args, args.calibration, seed=3, skip=args.count)[0] if p not in prompts]
    with state.split_between_processes(list(range(len(prompts)))) as mine:
        shard = run_methods(pipe, [prompts[i] for i in mine], [seeds[i] for i in mine], methods, args.steps,
                            guidance, args.repeats, progress=state.is_main_process, calibration=calibration)
    shards = gather_object([shard]) if state.num_processes > 1 else [shard]
    if not state.is_main_process:
        return 0
    result = summarize(*merge_runs(shards), prompts, check_faithfulness=args.model is None and args.prompts is None,
                       extra_metrics=extra)
    settings = {"model": args.model or "attnreuse default model", "sampler": args.sampler, "num_steps": args.steps,
                "guidance_scale": guidance, "repeats": args.repeats, "methods": methods, "seeds": seeds,
                "processes": state.num_processes, "calibration_prompts": calibration,
                "extra_metrics": {"clip_model": args.clip_model, "lpips": args.lpips, "fid": args.fid}}
    write_report(result, args.out, settings, pipe, prompts)
    print((__import__("pathlib").Path(args.out) / "eval.md").read_text())
    print(f"-> {args.out}/eval.json, eval.md, pareto.png, grid.png")
    return 0


def _analyze(args) -> int:
    """The paper's redundancy (Fig. 2) or sensitivity (Fig. 3) analysis: JSON + PNG plot."""
    from . import analysis

    pipe, guidance = _pipeline(args)
    prompts, seeds = _prompts(args, args.count, seed=0)
    run = getattr(analysis, args.kind)
    result = run(pipe, prompts, seeds, num_inference_steps=args.steps, guidance_scale=guidance, out=args.out)
    if args.kind == "redundancy":
        for name in ("self", "cross"):
            print(f"{name}-attention: normalised L1 distance to the previous step, steps 2..{args.steps}: "
                  + " ".join(f"{v:.3f}" for v in result[name]))
    else:
        fit = result["fit"]
        print("final-image distance per perturbed step: " + " ".join(f"{v:.3g}" for v in result["distance"]))
        print(f"fit k1*exp(-k2*s) on steps {fit['steps'][0]}..{fit['steps'][-1]}: k1={fit['k1']:.3g} "
              f"k2={fit['k2']:.3f} correlation {fit['correlation']:.3f}")
    print(f"-> {args.out}/{args.kind}.json and .png")
    return 0


def _generate(args) -> int:
    """One prompt with and without reuse on the default model (or any diffusers model); times both."""
    import torch

    from . import apply_attention_reuse
    from .metrics import psnr
    from .sampling import timed
    from .schedule import as_schedule

    schedule = as_schedule(args.schedule or f"hurry:{args.steps // 2}", num_steps=args.steps)  # fail fast
    pipe, guidance = _pipeline(args)
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

    budget = None if args.unet_minutes is None else 60 * args.unet_minutes
    path = train_default(args.out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                         vae_batch=args.vae_batch, unet_batch=args.unet_batch, unet_lr=args.unet_lr, device=args.device,
                         checkpoint_every=args.checkpoint_every, unet_budget_s=budget)
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
    train.add_argument("--unet-lr", type=float, default=5e-4)
    train.add_argument("--unet-minutes", type=float, help="train the UNet for as many steps (at most --unet-steps) "
                                                          "as fit this time; the count is recorded in training.json")
    train.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
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

    def command(name, func, help, description):
        """A subcommand with the options every model-running command shares."""
        p = sub.add_parser(name, help=help, description=description)
        p.add_argument("--model", help="diffusers model path or hub id (default: the shipped default model)")
        p.add_argument("--prompts", help="file with one prompt per line (default: captions of the shapes grammar)")
        p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
        p.add_argument("--steps", type=int, default=20)
        p.add_argument("--guidance", type=float, help="guidance scale (default: the model card's, 7.5 elsewhere)")
        p.add_argument("--device", default=device)
        p.set_defaults(func=func)
        return p

    search = command("search", _search, "search a reuse schedule (PHAST, or exhaustive for small N)",
                     "PHAST (paper Algorithm 1) from HURRY on a calibration set, utility = mean PSNR against the "
                     "no-reuse images; resumable through --state.")
    search.add_argument("--reuse", type=int, default=10, help="number of reuse steps r")
    search.add_argument("--calibration", type=int, default=8, help="calibration prompts (one seed each)")
    search.add_argument("--epsilon", type=float, default=0.0, help="minimum PSNR gain (dB) to keep a swap")
    search.add_argument("--exhaustive", action="store_true", help="score all C(N-1, r) schedules instead")
    search.add_argument("--out", default="runs/search/schedule.json")
    search.add_argument("--state", help="resume file (default: OUT with .state.json)")

    compare = command("compare", _compare, "PSNR of reuse schedules on held-out prompts and seeds",
                      "Mean PSNR against the no-reuse images for each schedule: hurry, early, random:K, a bit "
                      "string, or a schedule JSON (moved by timestep when it was searched for another sampler or "
                      "step count).")
    compare.add_argument("--schedules", default="hurry,early,random:3")
    compare.add_argument("--reuse", type=int, default=10)
    compare.add_argument("--count", type=int, default=16, help="held-out prompts (one seed each)")
    compare.add_argument("--out", default="runs/compare")

    ev2 = command("eval", _eval, "compare reuse with step reduction and the peers at measured latency",
                  "Run each method on the same prompts and seeds as the full N-step sampler and report latency, "
                  "peak memory, PSNR, SSIM (and, on the default model, the faithfulness checker; opt-in: CLIP score, "
                  "LPIPS, FID), matched-latency pairs, a Pareto plot and a grid.")
    ev2.add_argument("--methods", default="quick", help="comma list of presets (quick, paper) and methods: full, steps:K, "
                     "hurry:R, phast:R, FILE.json, bit strings, deepcache:I, tgate:S, tome:R, pab:K, taylorseer:I, "
                     "fbc:T, fastercache")
    ev2.add_argument("--count", type=int, default=8, help="prompts (one seed each)")
    ev2.add_argument("--calibration", type=int, default=4,
                     help="prompts phast:R searches on (captions of seed 3, or the prompt file's lines after the "
                          "first --count; never the evaluated ones); the schedule is cached in $ATTNREUSE_CACHE/"
                          "schedules (default ~/.cache/attnreuse/schedules)")
    ev2.add_argument("--clip-model", help="CLIP score against the prompts with this local transformers CLIP folder")
    ev2.add_argument("--lpips", action="store_true", help="LPIPS against the full images (AlexNet weights must be "
                                                          "in the torch hub cache)")
    ev2.add_argument("--fid", action="store_true", help="FID against the full images (InceptionV3 weights must be "
                                                        "in the torch hub cache)")
    ev2.add_argument("--repeats", type=int, default=2, help="timed rounds after the warm-up round")
    ev2.add_argument("--out", default="runs/eval")

    analyze = command("analyze", _analyze, "the paper's redundancy and sensitivity analyses (JSON + PNG)",
                      "Fig. 2 (distance between consecutive attention maps) or Fig. 3 (final-image change after "
                      "perturbing the logits at one step, with its exponential fit).")
    analyze.add_argument("kind", choices=["redundancy", "sensitivity"])
    analyze.add_argument("--count", type=int, default=8, help="prompts (one seed each)")
    analyze.add_argument("--out", default="runs/analysis")

    bench = sub.add_parser(
        "bench", help="per-call and end-to-end cost of each reuse mode on the SD1.5 / SDXL UNet architectures",
        description="Random-weight UNets from the published configs (attnreuse/configs): milliseconds of plain, "
                    "store and reuse calls per mode and a 20-step DDIM loop with the paper's PHAST schedule, each "
                    "as a ratio to the no-reuse baseline measured in the same run. fp16 on CUDA, fp32 on CPU.")
    bench.add_argument("--arch", default="sd15", help="comma list of sd15, sdxl")
    bench.add_argument("--batch", default="2", help="comma list of UNet batch sizes (2 = one image with CFG)")
    bench.add_argument("--modes", default="map,map-torch,map-fp8,qk,output,auto",
                       help="comma list of: map (Triton kernels where they run), map-torch (plain torch), map-fp16, "
                            "map-bf16 (the fast 16-bit map on CPUs with AMX), map-fp8, qk, output, auto; 'none' for "
                            "the plain call only")
    bench.add_argument("--schedule", default=None, help="end-to-end schedule (default: the paper's PHAST, r=10)")
    bench.add_argument("--repeats", type=int, help="timed calls per kind (default: 20 on CUDA, where one call is "
                                                   "launch-bound and jittery, 3 on CPU)")
    bench.add_argument("--e2e-repeats", type=int, default=3, help="timed end-to-end runs per mode")
    bench.add_argument("--e2e-modes", help="modes of the end-to-end runs (default: --modes; 'none' for none)")
    bench.add_argument("--compile", action="store_true", help="torch.compile the UNet first")
    bench.add_argument("--size", type=int, help="image size in pixels (default: 512 for sd15, 1024 for sdxl)")
    bench.add_argument("--max-cache", type=float, metavar="GIB",
                       help="memory budget of the cache in GiB (max_cache_bytes); layers that do not fit fall back")
    bench.add_argument("--device", default=device)
    bench.add_argument("--dtype", help="float16, bfloat16 or float32 (default: float16 on CUDA, float32 on CPU)")
    bench.add_argument("--quality", action="store_true",
                       help="instead of timing: PSNR of each mode against no reuse on the default model (or --model)")
    bench.add_argument("--model", help="with --quality: a diffusers model path or hub id (default: the default model)")
    bench.add_argument("--count", type=int, default=16, help="with --quality: held-out captions (one seed each)")
    bench.add_argument("--out", default="runs/bench", help="folder for bench.json and bench.md (appended)")
    bench.set_defaults(func=_bench)
    return parser


def _modes(text: str) -> tuple[str, ...]:
    """A comma list of bench modes; "none" for no mode."""
    return () if text == "none" else tuple(text.split(","))


def _bench(args) -> int:
    """Run `bench.bench` for each architecture and batch, print markdown tables, append to OUT/bench.json."""
    from pathlib import Path

    from . import bench as b

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quality:
        args.sampler, args.guidance = "ddim", None
        pipe, guidance = _pipeline(args)
        modes = [m for m in args.modes.split(",") if m != "map-torch"]  # the same map as "map"
        result = b.quality(pipe, args.schedule or b.PAPER_PHAST_DDIM20, args.count, modes, guidance)
        rows = [f"| {m} | {r['psnr_vs_full_db']:.2f} dB | {r['psnr_vs_map_db']:.2f} dB | {r['cache_mib']:.1f} MiB |"
                for m, r in result["modes"].items()]
        text = "\n".join([f"Schedule `{result['schedule']}`, {result['count']} held-out captions, guidance "
                          f"{result['guidance']}:", "", "| mode | PSNR vs no reuse | PSNR vs map mode | cache |",
                          "|---|---|---|---|", *rows, ""])
        print(text)
        (out / "quality.json").write_text(json.dumps(result, indent=1))
        (out / "quality.md").write_text(text)
        return 0
    path = out / "bench.json"
    results = json.loads(path.read_text()) if path.exists() else []
    for arch in args.arch.split(","):
        for batch in (int(x) for x in args.batch.split(",")):
            e2e = None if args.e2e_modes is None else _modes(args.e2e_modes)
            repeats = args.repeats or (20 if args.device.startswith("cuda") else 3)
            result = b.bench(arch, batch, args.device, args.dtype, _modes(args.modes), repeats,
                             args.e2e_repeats, args.schedule or b.PAPER_PHAST_DDIM20, args.compile, e2e, args.size,
                             None if args.max_cache is None else int(args.max_cache * 2**30))
            print(b.markdown([result]), flush=True)
            results.append(result)
            path.write_text(json.dumps(results, indent=1))
            (out / "bench.md").write_text(b.markdown(results))
    return 0


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
