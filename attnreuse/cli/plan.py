"""`attnreuse plan`: search a reuse plan for a latency budget on calibration prompts."""

from __future__ import annotations

from pathlib import Path

from ..cli.pipeline import add_model_options, check_model_options, pipeline, prompts
from ..default_model.splits import CALIBRATION
from ..files import read_json
from ..pipelines.sampling import GenerationSetup
from ..pipelines.timing import device_name
from . import checks
from .checks import UsageError

__all__ = ["register", "run_plan"]


def register(sub) -> None:
    plan = add_model_options(sub.add_parser(
        "plan", help="search a reuse plan (every unit, every call) for a latency budget",
        description="Search the plan of best calibration PSNR whose predicted latency is within --budget of the "
                    "full sampler. --effort quick (the default): one recorded run of the full sampler, a table of "
                    "what reusing each call's output costs the final image (from the scheduler's own response), a "
                    "dynamic program over refresh calls and a few verified candidates, about 3 runs of the "
                    "calibration set in all. --effort full: profile every kind of call, then seeds (DeepCache, "
                    "step-reduction-like, HURRY, PAB-like), dynamic programs and a budgeted hill-climb (hundreds of "
                    "runs; resumable through --state). Prints the predicted and the measured latency."))
    goal = plan.add_mutually_exclusive_group(required=True)
    goal.add_argument("--budget", type=float, help="latency as a ratio to the full sampler, e.g. 0.5")
    goal.add_argument("--target-psnr", type=float, help="the fastest plan whose calibration PSNR against the full "
                      "sampler is at least this many dB (quick planner)")
    plan.add_argument("--effort", choices=("quick", "full"), default="quick",
                      help="quick: the quick planner (default); full: the profile and the hill-climb")
    plan.add_argument("--calibration", type=int, default=8, help="calibration prompts (one seed each)")
    plan.add_argument("--time-limit", type=float, help="seconds of hill-climbing at most (full; default 840)")
    plan.add_argument("--sweeps", type=int, help="hill-climbing sweeps at most (full; default 30)")
    plan.add_argument("--profile", help="a latency profile to reuse: a plan JSON searched on this device and batch")
    plan.add_argument("--no-measure", action="store_true", help="skip measuring the plan's latency at the end")
    plan.add_argument("--out", default="runs/plan/plan.json")
    plan.add_argument("--state", help="resume file (full; default: OUT with .state.json)")
    plan.set_defaults(func=run_plan)


def check_plan(args):
    """Every argument of `plan`, before the model loads; returns the latency profile to reuse and the model it
    timed (None, None: none given)."""
    check_model_options(args, args.calibration)
    if args.target_psnr is not None:
        checks.finite(args.target_psnr, "--target-psnr", above=0)
        if args.effort == "full":
            raise UsageError("--target-psnr is planned by the quick planner; leave out --effort full.")
    else:
        checks.finite(args.budget, "--budget", above=0)
        if args.budget > 1:
            raise UsageError(f"--budget is a latency ratio to the full sampler, at most 1, got {args.budget:g}.")
    checks.at_least(args.calibration, "--calibration", 1)
    _check_climb(args)
    checks.writable_file(args.out, "--out", (".json",))
    if args.state:
        checks.writable_file(args.state, "--state", (".json",))
    if not args.profile:
        return None, None
    from ..search import LatencyModel

    try:
        meta = read_json(checks.readable_file(args.profile, "--profile"), "--profile file").get("meta", {})
        if args.effort == "full" and meta.get("strategy") == "quick planner":
            raise UsageError(f"--profile {args.profile}: a quick plan times only a reused call; --effort full needs "
                             "a full search's profile (or none).")
        return LatencyModel.from_dict(meta["latency_model"]), meta.get("model")
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        raise UsageError(f"--profile {args.profile}: not a plan with a latency profile ({err}).") from None


def _check_climb(args) -> None:
    """The options of the full search's climb: refused with the quick planner, which has no climb to steer."""
    given = [name for name, value in (("--time-limit", args.time_limit), ("--sweeps", args.sweeps),
                                      ("--state", args.state)) if value is not None]
    if args.effort == "quick":
        if given:
            raise UsageError(f"{given[0]} steers the full search's climb; add --effort full, or leave it out.")
        return
    args.time_limit = 840.0 if args.time_limit is None else args.time_limit
    args.sweeps = 30 if args.sweeps is None else args.sweeps
    checks.finite(args.time_limit, "--time-limit", minimum=0)
    checks.at_least(args.sweeps, "--sweeps", 0)


def run_plan(args) -> int:
    """Search on one process, or spread the scoring over those `accelerate launch` or torchrun started."""
    from ..search import PlanningError
    from ..search.planner import Shards

    latency, profiled = check_plan(args)
    shards = Shards.from_accelerate()
    pipe, guidance = pipeline(args)
    setup = GenerationSetup(pipe, prompts(args, args.calibration, seed=CALIBRATION), None, args.steps, guidance)
    _check_profile(latency, profiled, setup, args.profile)
    try:
        return _planned(args, setup, latency, shards)
    except PlanningError as err:
        raise UsageError(str(err)) from None


def _check_profile(latency, profiled: str | None, setup: GenerationSetup, path) -> None:
    """A --profile times the calls of one model, device and batch: one of another is refused, saying what differs."""
    if latency is None:
        return
    from ..search.evaluator import model_name

    here = {"model": model_name(setup.pipe), "device": device_name(setup.device), "batch": 2 * len(setup.prompts)}
    there = {"model": profiled or here["model"], "device": latency.device,
             "batch": latency.batch}
    differs = [f"{k} {there[k]!r} there, {here[k]!r} here" for k in here if there[k] != here[k]]
    if differs:
        raise UsageError(f"--profile {path} was timed for another setup ({'; '.join(differs)}); leave it out to "
                         "time this one (batch is twice --calibration).")


def _planned(args, setup: GenerationSetup, latency, shards) -> int:
    from ..search import quick_plan, search_plan

    out = Path(args.out)
    if args.effort == "quick":
        plan = quick_plan(setup, args.budget, progress=True, measure=not args.no_measure, latency=latency,
                          target_psnr=args.target_psnr)
        if not shards.main:  # every process plans alike; one writes
            return 0
        plan.to_json(out)
        _print_quick(plan, args, len(setup.prompts), out)
        return 0
    state = Path(args.state) if args.state else out.with_suffix(".state.json")
    plan = search_plan(setup, args.budget, state, progress=True, time_limit=args.time_limit, sweeps=args.sweeps,
                       measure=not args.no_measure, latency=latency, shards=shards)
    if not shards.main:
        return 0
    plan.to_json(out)
    m = plan.meta
    print(f"plan for a budget of {args.budget:g} ({args.sampler}, {args.steps} steps, {len(setup.prompts)} "
          f"calibration prompts): PSNR {m['psnr_db']:.2f} dB against the full sampler (best seed "
          f"{m['best_seed_psnr_db']:.2f}, dynamic program {m['best_dp_psnr_db']:.2f}, hill-climb "
          f"{m['climb_gain_db']:+.2f} dB); latency predicted {m['predicted_latency']:.3f}x{_measured(m)} on "
          f"{m['latency_model']['device']}; {m['candidates']} candidates in {m['search_s']:.0f} s -> {out}")
    print(f"  {plan}")
    return 0


def _measured(meta: dict) -> str:
    return f", measured {meta['measured']['ratio']:.3f}x" if "measured" in meta else ""


def _print_quick(plan, args, count: int, out: Path) -> None:
    m = plan.meta
    goal = f"a budget of {args.budget:g}" if args.budget is not None else f"a target of {args.target_psnr:g} dB"
    print(f"plan for {goal} ({args.sampler}, {args.steps} steps, {count} calibration prompts, "
          f"quick planner): PSNR {m['psnr_db']:.2f} dB against the full sampler; latency predicted "
          f"{m['predicted_latency']:.3f}x{_measured(m)} on {m['latency_model']['device']}; cost "
          f"{m['denoiser_calls']} denoiser calls ({m['full_runs']:.1f} runs of the calibration set), "
          f"{m['search_s']:.0f} s -> {out}")
    print(f"  {plan}")
