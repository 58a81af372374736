"""`attnreuse analyze`: the paper's redundancy (Fig. 2) and sensitivity (Fig. 3) analyses, JSON + PNG."""

from __future__ import annotations

from ..cli.pipeline import add_model_options, check_model_options, pipeline, prompts
from ..default_model.splits import EVALUATION
from ..eval import analysis
from . import checks
from .checks import UsageError

__all__ = ["register", "run_analyze"]


def register(sub) -> None:
    analyze = add_model_options(sub.add_parser(
        "analyze", help="the paper's redundancy and sensitivity analyses (JSON + PNG)",
        description="Fig. 2 (distance between consecutive attention maps) or Fig. 3 (final-image change after "
                    "perturbing the logits at one step, with its exponential fit)."))
    analyze.add_argument("kind", choices=["redundancy", "sensitivity"])
    analyze.add_argument("--count", type=int, default=8, help="prompts (one seed each)")
    analyze.add_argument("--out", default="runs/analysis")
    analyze.set_defaults(func=run_analyze)


def check_analyze(args) -> None:
    check_model_options(args, args.count)
    checks.at_least(args.count, "--count", 1)
    if args.steps < (4 if args.kind == "sensitivity" else 2):
        raise UsageError(f"--steps: the {args.kind} analysis needs at least {4 if args.kind == 'sensitivity' else 2} "
                         f"steps, got {args.steps}.")
    checks.writable_dir(args.out, "--out")


def run_analyze(args) -> int:
    check_analyze(args)
    pipe, guidance = pipeline(args)
    chosen = prompts(args, args.count, seed=EVALUATION)
    run = getattr(analysis, args.kind)
    result = run(pipe, chosen, list(range(len(chosen))), num_inference_steps=args.steps, guidance_scale=guidance,
                 out=args.out)
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
