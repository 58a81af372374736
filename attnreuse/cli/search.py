"""`attnreuse search` (PHAST or exhaustive search on calibration prompts) and `attnreuse compare` (schedules on
held-out prompts)."""

from __future__ import annotations

from pathlib import Path

from ..cli.pipeline import add_model_options, check_model_options, pipeline, prompts
from ..default_model.splits import CALIBRATION, EVALUATION
from ..files import atomic_write, read_json, write_json
from ..pipelines.sampling import GenerationSetup
from ..search import Evaluator, named_schedules, search_schedule
from ..search.phast import EXHAUSTIVE_MAX_STEPS
from . import checks
from .checks import UsageError

__all__ = ["register", "run_search", "run_compare"]


def register(sub) -> None:
    search = add_model_options(sub.add_parser(
        "search", help="search a reuse schedule (PHAST, or exhaustive for small N)",
        description="PHAST (paper Algorithm 1) from HURRY on a calibration set, utility = mean PSNR against the "
                    "no-reuse images; resumable through --state."))
    search.add_argument("--reuse", type=int, default=10, help="number of reuse steps r")
    search.add_argument("--calibration", type=int, default=8, help="calibration prompts (one seed each)")
    search.add_argument("--epsilon", type=float, default=0.0, help="minimum PSNR gain (dB) to keep a swap")
    search.add_argument("--exhaustive", action="store_true", help="score all C(N-1, r) schedules instead")
    search.add_argument("--out", default="runs/search/schedule.json")
    search.add_argument("--state", help="resume file (default: OUT with .state.json)")
    search.set_defaults(func=run_search)

    compare = add_model_options(sub.add_parser(
        "compare", help="PSNR of reuse schedules on held-out prompts and seeds",
        description="Mean PSNR against the no-reuse images for each schedule: hurry, early, random:K, a bit string, "
                    "or a schedule JSON (moved by timestep when it was searched for another sampler or step count)."))
    compare.add_argument("--schedules", default="hurry,early,random:3")
    compare.add_argument("--reuse", type=int, default=10)
    compare.add_argument("--count", type=int, default=16, help="held-out prompts (one seed each)")
    compare.add_argument("--out", default="runs/compare")
    compare.set_defaults(func=run_compare)


def _check_reuse(args) -> None:
    if not 0 <= args.reuse < args.steps:
        raise UsageError(f"--reuse must be from 0 to --steps - 1 (the first step computes), got {args.reuse} with "
                         f"--steps {args.steps}.")


def check_search(args) -> Path:
    """Every argument of `search`, before the model loads; returns the state file."""
    check_model_options(args, args.calibration)
    checks.at_least(args.calibration, "--calibration", 1)
    checks.finite(args.epsilon, "--epsilon", minimum=0)
    _check_reuse(args)
    if args.exhaustive and args.steps > EXHAUSTIVE_MAX_STEPS:
        raise UsageError(f"--exhaustive is for --steps <= {EXHAUSTIVE_MAX_STEPS}; {args.steps} steps would take too "
                         "long. Leave --exhaustive out to run PHAST.")
    checks.writable_file(args.out, "--out", (".json",))
    state = Path(args.state) if args.state else Path(args.out).with_suffix(".state.json")
    checks.writable_file(state, "--state", (".json",))
    if state.exists() and not isinstance(_read(state, "--state"), dict):
        raise UsageError(f"--state {state}: not a search state file; delete it to start over.")
    return state


def _read(path, name: str):
    try:
        return read_json(path, f"{name} file")
    except ValueError as err:
        raise UsageError(str(err)) from None


def run_search(args) -> int:
    """PHAST (or exhaustive) search on a calibration set; writes the schedule JSON and a summary."""
    state = check_search(args)
    pipe, guidance = pipeline(args)
    setup = GenerationSetup(pipe, prompts(args, args.calibration, seed=CALIBRATION), None, args.steps, guidance)
    out = Path(args.out)
    try:
        evaluator = Evaluator(setup, state_file=state, progress=True)
    except ValueError as err:  # the state file is for another setup or damaged
        raise UsageError(str(err)) from None
    schedule = search_schedule(evaluator, args.reuse, args.epsilon, args.exhaustive,
                               model=args.model or "attnreuse default model", sampler=args.sampler,
                               calibration_seed=CALIBRATION)
    schedule.to_json(out, indent=1)
    m = schedule.meta
    print(f"{m.get('strategy')} schedule {schedule}: "
          f"{m['psnr_db']:.2f} dB mean PSNR vs no reuse on {len(setup.prompts)} calibration images "
          f"(HURRY {m['hurry_psnr_db']:.2f} dB); "
          f"{m['evaluations']} schedules, {m['model_calls']} denoiser calls with shared prefixes vs "
          f"{m['naive_model_calls']} for full runs ({m['naive_model_calls'] / max(1, m['model_calls']):.1f}x fewer) "
          f"-> {out}")
    return 0


def check_compare(args) -> list[str]:
    """Every argument of `compare`, before the model loads; returns the schedule names."""
    check_model_options(args, args.count)
    checks.at_least(args.count, "--count", 1)
    _check_reuse(args)
    checks.writable_dir(args.out, "--out")
    names = [n.strip() for n in args.schedules.split(",") if n.strip()]
    if not names:
        raise UsageError("--schedules is empty.")
    for name in names:
        if name in ("hurry", "early"):
            continue
        if name.startswith("random"):
            count = name.partition(":")[2] or "1"
            if not count.isdigit() or int(count) < 1:
                raise UsageError(f"--schedules {name}: random:K needs a whole number K >= 1.")
            continue
        checks.schedule(name, args.steps, args.sampler, name="--schedules")
    return names


def run_compare(args) -> int:
    """Mean PSNR vs no reuse of named schedules on held-out prompts and seeds; JSON + markdown table."""
    names = check_compare(args)
    pipe, guidance = pipeline(args)
    setup = GenerationSetup(pipe, prompts(args, args.count, seed=EVALUATION), None, args.steps, guidance)
    evaluator = Evaluator(setup, progress=True)
    rows = []
    for name, schedule in named_schedules(names, args.steps, args.reuse, evaluator.timesteps):
        rows.append({"strategy": name, "schedule": str(schedule), "reuse_steps": schedule.num_reuse,
                     "psnr_db": evaluator([schedule])[0]})
    out = Path(args.out)
    write_json(out / "compare.json", {"model": args.model or "attnreuse default model", "sampler": args.sampler,
                                      "steps": args.steps, "guidance": guidance, "prompts": setup.prompts,
                                      "seeds": setup.seeds, "rows": rows, "model_calls": evaluator.calls,
                                      "naive_model_calls": evaluator.naive_calls})
    table = ["| strategy | schedule (1 = compute) | reuse steps | mean PSNR vs no reuse (dB) |", "|---|---|---|---|"]
    table += [f"| {r['strategy']} | `{r['schedule']}` | {r['reuse_steps']} | {r['psnr_db']:.2f} |" for r in rows]
    atomic_write(out / "compare.md", lambda tmp: tmp.write_text("\n".join(table) + "\n"))
    print(f"{args.sampler} {args.steps} steps, guidance {guidance}, {len(setup.prompts)} held-out prompts x seeds:")
    print("\n".join(table))
    return 0
