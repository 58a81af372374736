"""`attnreuse eval`: every method on the same prompts and seeds against the full sampler, at measured latency."""

from __future__ import annotations

import sys
from pathlib import Path

from ..cli.pipeline import add_model_options, check_model_options, pipeline, prompts, shipped
from ..default_model.faithfulness import pass_rates
from ..default_model.splits import CALIBRATION, EVALUATION
from ..eval.methods import PRESETS, check_spec, expand, lookup, model_kind, records
from ..eval.metrics import load_extra_metrics
from ..eval.report import write_report
from ..eval.runner import merge_runs, run_methods, summarize
from ..pipelines.sampling import GenerationSetup
from . import checks
from .checks import UsageError

__all__ = ["register", "run_eval", "methods_help"]


def _calibrated(methods=None) -> str:
    """The usages of the methods (by default every registered one) that run on calibration prompts first."""
    specs = records() if methods is None else [lookup(m) for m in methods]
    return ", ".join(dict.fromkeys(spec.typed for spec in specs if spec.calibrated))


def methods_help() -> str:
    """--methods' help: the presets and every method's usage, as the method registry (`eval.methods`) lists them."""
    return (f"comma list of presets ({', '.join(PRESETS)}; each runs the methods that apply to the model's kind, "
            f"UNet or transformer) and methods: {', '.join(spec.usage for spec in records())}")


def register(sub) -> None:
    ev = add_model_options(sub.add_parser(
        "eval", help="compare reuse with step reduction and the peers at measured latency",
        description="Run each method on the same prompts and seeds as the full N-step sampler and report latency, "
                    "peak memory, PSNR, SSIM (and, on the default model, the faithfulness checker; opt-in: CLIP "
                    "score, LPIPS, FID), matched-latency pairs, a Pareto plot and a grid."))
    ev.add_argument("--methods", default="quick", help=methods_help())
    ev.add_argument("--count", type=int, default=8, help="prompts (one seed each)")
    ev.add_argument("--calibration", type=int, default=4,
                    help=f"prompts {_calibrated()} run on first (captions of the calibration split, or the prompt "
                         "file's lines after the first --count; never the evaluated ones); a search is cached in "
                         "$ATTNREUSE_CACHE (default ~/.cache/attnreuse); on the default model, --calibration 8 "
                         "reads the shipped plans")
    ev.add_argument("--clip-model", help="CLIP score against the prompts with this local transformers CLIP folder")
    ev.add_argument("--lpips", action="store_true", help="LPIPS against the full images (AlexNet weights must be "
                                                         "in the torch hub cache)")
    ev.add_argument("--fid", action="store_true", help="FID against the full images (InceptionV3 weights must be "
                                                       "in the torch hub cache)")
    ev.add_argument("--repeats", type=int, default=2, help="timed rounds after the warm-up round")
    ev.add_argument("--out", default="runs/eval")
    ev.set_defaults(func=run_eval)


def check_eval(args) -> dict:
    """Every argument of `eval`, before the model loads: the methods (the presets' entries for every model kind)
    and the opt-in metrics' files, which it returns loaded."""
    methods = expand(args.methods)
    if not methods:
        raise UsageError("--methods is empty.")
    check_model_options(args, args.count)
    for name, minimum in (("count", 1), ("repeats", 1), ("calibration", 0)):
        checks.at_least(getattr(args, name), f"--{name}", minimum)
    try:
        for spec in methods:
            check_spec(spec, args.steps)
        extra = load_extra_metrics(args.clip_model, args.lpips, args.fid)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    calibrated = _calibrated(methods)
    if calibrated and args.calibration < 1:
        raise UsageError(f"{calibrated} run on calibration prompts first: --calibration must be at least 1.")
    checks.writable_dir(args.out, "--out")
    return extra


def run_eval(args) -> int:
    """Every method on the same prompts and seeds against `full`; JSON, markdown, Pareto plot and grid. Started
    by `accelerate launch` (or torchrun), the prompts are split between the processes and merged into one report."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    extra = check_eval(args)
    state = PartialState(cpu=args.device == "cpu")
    if state.num_processes > 1 and args.device != "cpu":
        args.device = str(state.device)
    pipe, guidance = pipeline(args)
    methods = expand(args.methods, model_kind(pipe))  # a preset runs what applies to this model's kind
    evaluated = prompts(args, args.count, seed=EVALUATION)
    setup = GenerationSetup(pipe, evaluated, None, args.steps, guidance)
    # phast:R searches on the calibration split (or the prompt file's lines after the evaluated ones), less any
    # prompt evaluated here
    calibration = [p for p in prompts(args, args.calibration, seed=CALIBRATION, skip=args.count) if p not in evaluated]
    with state.split_between_processes(list(range(len(evaluated)))) as mine:
        shard = run_methods(setup.subset(mine), methods, args.repeats, state.is_main_process, calibration)
    shards = gather_object([shard]) if state.num_processes > 1 else [shard]
    if not state.is_main_process:
        return 0
    faithfulness = _pass_rate if shipped(args.model) and args.prompts is None else None  # captions it can check
    result = summarize(*merge_runs(shards), evaluated, faithfulness, extra)
    settings = {"model": args.model or "attnreuse default model", "sampler": args.sampler, "num_steps": args.steps,
                "guidance_scale": guidance, "repeats": args.repeats, "methods": methods, "seeds": setup.seeds,
                "processes": state.num_processes, "calibration_prompts": calibration,
                "extra_metrics": {"clip_model": args.clip_model, "lpips": args.lpips, "fid": args.fid}}
    write_report(result, args.out, settings, pipe, evaluated)
    print((Path(args.out) / "eval.md").read_text())
    print(f"-> {args.out}/eval.json, eval.md, pareto.png, grid.png")
    failed = [r for r in result["rows"] if "error" in r]
    if failed:  # the report holds the rest; the exit status says it is not whole
        print(f"attnreuse: error: {len(failed)} method(s) could not run, the report says why: "
              + "; ".join(f"{r['method']}: {r['error']}" for r in failed), file=sys.stderr)
        return 1
    return 0


def _pass_rate(images, prompts) -> float:
    """The faithfulness checker's pass rate on the shipped models' captions."""
    return pass_rates(images, prompts)["pass_rate"]
