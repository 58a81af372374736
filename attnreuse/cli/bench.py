"""`attnreuse bench`: per-call and end-to-end cost of each reuse mode, or (`--quality`) its fidelity."""

from __future__ import annotations

from pathlib import Path

from ..bench import PAPER_PHAST_DDIM20, VARIANTS, bench, markdown, quality
from ..bench.models import RESOLUTION, TRANSFORMERS
from ..cli.pipeline import default_device, load_model, prompts
from ..default_model.splits import EVALUATION
from ..files import atomic_write, read_json, write_json
from ..pipelines.tiny import ARCHS, MODEL_ONLY
from . import checks
from .checks import UsageError

__all__ = ["register", "run_bench"]


def register(sub) -> None:
    b = sub.add_parser(
        "bench", help="per-call and end-to-end cost of each reuse mode on UNet and transformer architectures",
        description="Random-weight denoisers from the published configs (attnreuse/bench/configs): milliseconds of "
                    "plain, store and reuse calls per mode and a 20-step loop (DDIM with CFG for UNets, a "
                    "flow-matching Euler loop for transformers) with the paper's PHAST schedule, each as a ratio to "
                    "the no-reuse baseline measured in the same run. fp16 on CUDA, fp32 on CPU.")
    b.add_argument("--arch", default="sd15", help="comma list of sd15, sdxl, pixart-sigma, sd3-medium, flux-dev (or a "
                                                  "tiny one of attnreuse.pipelines.tiny)")
    b.add_argument("--layers", type=int, help="transformers: keep this many blocks (Flux: of each kind), for a CPU")
    b.add_argument("--text-tokens", type=int, help="transformers: text tokens per call (default: the pipeline's)")
    b.add_argument("--batch", default="2", help="comma list of UNet batch sizes (2 = one image with CFG)")
    b.add_argument("--modes", default="map,map-torch,map-fp8,qk,output,auto",
                   help="comma list of: map (Triton kernels where they run), map-torch (plain torch), map-fp16, "
                        "map-bf16 (the fast 16-bit map on CPUs with AMX), map-fp8, qk, output, auto, blocks (every "
                        "transformer block reuses its residual); 'none' for the plain call only")
    b.add_argument("--schedule", default=None, help="end-to-end schedule (default: the paper's PHAST, r=10)")
    b.add_argument("--repeats", type=int, help="timed calls per kind (default: 20 on CUDA, where one call is "
                                               "launch-bound and jittery, 3 on CPU)")
    b.add_argument("--e2e-repeats", type=int, default=3, help="timed end-to-end runs per mode")
    b.add_argument("--e2e-modes", help="modes of the end-to-end runs (default: --modes; 'none' for none)")
    b.add_argument("--compile", action="store_true", help="torch.compile the UNet first")
    b.add_argument("--size", type=int, help="image size in pixels (default: 512 for sd15, 1024 for sdxl)")
    b.add_argument("--max-cache", type=float, metavar="GIB",
                   help="memory budget of the cache in GiB (max_cache_bytes); layers that do not fit fall back")
    b.add_argument("--device", default=default_device())
    b.add_argument("--dtype", help="float16, bfloat16 or float32 (default: float16 on CUDA, float32 on CPU)")
    b.add_argument("--quality", action="store_true",
                   help="instead of timing: PSNR of each mode against no reuse on the default model (or --model)")
    b.add_argument("--model", help="with --quality: a diffusers model path or hub id (default: the default model)")
    b.add_argument("--prompts", help="with --quality and --model: file with one prompt per line")
    b.add_argument("--count", type=int, default=16, help="with --quality: held-out captions (one seed each)")
    b.add_argument("--out", default="runs/bench", help="folder for bench.json and bench.md (appended)")
    b.set_defaults(func=run_bench)


def _modes(text: str) -> tuple[str, ...]:
    """A comma list of bench modes; "none" for no mode."""
    return () if text == "none" else tuple(text.split(","))


def _numbers(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{name} {text!r}: a comma list of whole numbers.") from None
    for value in values:
        checks.at_least(value, name, 1)
    return values


def check_bench(args) -> tuple[list[str], list[int], tuple, tuple | None]:
    """Every argument of `bench`, before anything is built: architectures, batches, modes and the rest."""
    checks.device(args.device)
    archs = [a for a in args.arch.split(",") if a]
    known = {*RESOLUTION, *TRANSFORMERS, *ARCHS, *MODEL_ONLY}
    unknown = [a for a in archs if a not in known]
    if not archs or unknown:
        raise UsageError(f"--arch {args.arch!r}: choose from {sorted({*RESOLUTION, *TRANSFORMERS})} (or "
                         f"{sorted({*ARCHS, *MODEL_ONLY})}).")
    checks.at_least(args.layers, "--layers", 1)
    checks.at_least(args.text_tokens, "--text-tokens", 1)
    batches = _numbers(args.batch, "--batch")
    modes, e2e = _modes(args.modes), None if args.e2e_modes is None else _modes(args.e2e_modes)
    bad = [m for m in (*modes, *(e2e or ())) if m not in VARIANTS]
    if bad:
        raise UsageError(f"Unknown bench mode(s) {bad}; choose from {sorted(VARIANTS)}.")
    unets = [a for a in archs if a in RESOLUTION or ARCHS.get(a, {}).get("family") == "unet"]
    if unets and (e2e is None and modes or e2e) and any(b % 2 for b in batches):
        raise UsageError("--batch: a UNet's end-to-end loop runs both CFG branches in one batch, so batches must be "
                         "even (or pass --e2e-modes none).")
    for name in ("repeats", "e2e_repeats", "count"):
        checks.at_least(getattr(args, name), f"--{name.replace('_', '-')}", 1)
    checks.image_size(args.size)
    checks.finite(args.max_cache, "--max-cache", minimum=0)
    if args.dtype not in (None, "float16", "bfloat16", "float32"):
        raise UsageError(f"--dtype {args.dtype!r}: choose float16, bfloat16 or float32.")
    if args.schedule:
        checks.schedule(args.schedule, len(args.schedule), name="--schedule")
    checks.model(args.model)
    checks.writable_dir(args.out, "--out")
    return archs, batches, modes, e2e


def _quality(args, out: Path) -> int:
    from ..default_model import DEFAULT_GUIDANCE

    pipe = load_model(args.model, args.device)
    guidance = DEFAULT_GUIDANCE if args.model is None else 7.5
    modes = [m for m in _modes(args.modes) if m != "map-torch"]  # the same map as "map"
    result = quality(pipe, args.schedule or PAPER_PHAST_DDIM20, prompts(args, args.count, EVALUATION), modes,
                     guidance)
    rows = [f"| {m} | {r['psnr_vs_full_db']:.2f} dB | {r['psnr_vs_map_db']:.2f} dB | {r['cache_mib']:.1f} MiB |"
            for m, r in result["modes"].items()]
    text = "\n".join([f"Schedule `{result['schedule']}`, {result['count']} held-out captions, guidance "
                      f"{result['guidance']}:", "", "| mode | PSNR vs no reuse | PSNR vs map mode | cache |",
                      "|---|---|---|---|", *rows, ""])
    print(text)
    write_json(out / "quality.json", result)
    atomic_write(out / "quality.md", lambda tmp: tmp.write_text(text))
    return 0


def _earlier_results(path: Path) -> list:
    """The results a previous run appended to bench.json, which this run appends to."""
    if not path.exists():
        return []
    try:
        results = read_json(path, "bench results")
    except ValueError as err:
        raise UsageError(f"{err} Move it away to start a new one.") from None
    if not isinstance(results, list) or not all(isinstance(r, dict) and "setup" in r for r in results):
        raise UsageError(f"bench results {path}: not a list of bench results; move it away to start a new one.")
    return results


def run_bench(args) -> int:
    """`bench` for each architecture and batch: markdown tables printed, appended to OUT/bench.json."""
    archs, batches, modes, e2e = check_bench(args)
    out = Path(args.out)
    if args.quality:
        return _quality(args, out)
    path = out / "bench.json"
    results = _earlier_results(path)
    for arch in archs:
        for batch in batches:
            repeats = args.repeats or (20 if args.device.startswith("cuda") else 3)
            result = bench(arch, batch, args.device, args.dtype, modes, repeats, args.e2e_repeats,
                           args.schedule or PAPER_PHAST_DDIM20, args.compile, e2e, args.size,
                           None if args.max_cache is None else int(args.max_cache * 2**30), args.layers,
                           args.text_tokens)
            print(markdown([result]), flush=True)
            results.append(result)
            write_json(path, results)
            atomic_write(out / "bench.md", lambda tmp: tmp.write_text(markdown(results)))
    return 0
