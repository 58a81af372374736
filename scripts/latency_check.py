"""Predicted against measured latency of plans: the planner's latency model (a profile of the kinds of call the
plans make) beside the plans' generations timed against the full sampler's, alternating, on this machine.
JSON and a markdown table. `python scripts/latency_check.py --model sd15 --steps 10` (SD1.5's UNet at 384 px,
random weights) or `--model default` (the shipped model, 8 calibration captions)."""

import argparse
import json

from attnreuse.default_model import load_default_pipeline
from attnreuse.default_model.splits import CALIBRATION, captions
from attnreuse.files import write_json
from attnreuse.layers import denoiser
from attnreuse.pipelines.sampling import GenerationSetup
from attnreuse.pipelines.timing import device_name
from attnreuse.pipelines.tiny import build_pipeline
from attnreuse.search import Candidate, Levels, measure_latency, profile


def candidates(n: int, structure: Levels) -> dict[str, Candidate]:
    """Plans of each kind the planner makes: DeepCache-like, step-reduction-like, front-loaded, mixed, attention."""
    full, top = (1,) * n, structure.top
    front = {0, 1, 2, n // 3, n // 2, (3 * n) // 4}
    made = {
        "deepcache interval 3, depth 1": Candidate(tuple(0 if c % 3 == 0 else top - 1 for c in range(n)), full),
        "whole call every other": Candidate(tuple(0 if c % 2 == 0 else top for c in range(n)), full),
        "front-loaded refreshes, whole call between": Candidate(tuple(0 if c in front else top for c in range(n)),
                                                                full),
        "refreshes, branch at depth 3 between": Candidate(tuple(0 if c in front else top - 3 for c in range(n)),
                                                          full),
        "attention output reuse, last half": Candidate((0,) * n, (1,) * (n - n // 2) + (0,) * (n // 2)),
    }
    return {name: Candidate(c.levels, c.attention, c.mode, structure) for name, c in made.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="sd15", help="sd15 (random weights) or default (the shipped model)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="runs/latency_check")
    args = parser.parse_args()
    if args.model == "default":
        setup = GenerationSetup(load_default_pipeline(), captions(8, CALIBRATION), None, args.steps, 4.5)
    else:
        setup = GenerationSetup(build_pipeline(args.model), ["a red circle left of a blue square"], None,
                                args.steps, 7.5)
    structure = Levels.of(denoiser(setup.pipe))
    plans = candidates(args.steps, structure)
    kinds = {k for c in plans.values() for k in zip(c.levels, c.attention_actions())}
    model = profile(setup, structure, repeats=3, progress=True, kinds=kinds)
    rows = []
    for name, candidate in plans.items():
        measured = measure_latency(setup, candidate.plan(complete=False), rounds=args.rounds)
        predicted = candidate.cost(model)
        rows.append({"plan": name, "predicted": predicted, "measured": measured["ratio"],
                     "error": predicted / measured["ratio"] - 1, "full_s": measured["full_s"]})
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"{args.model}, {args.steps} steps, batch {model.batch}, {device_name(setup.device)}:", "",
             "| plan | predicted | measured | error |", "|---|---|---|---|"]
    lines += [f"| {r['plan']} | {r['predicted']:.3f}x | {r['measured']:.3f}x | {r['error']:+.1%} |" for r in rows]
    print("\n".join(lines))
    write_json(f"{args.out}/{args.model}.json", {"profile": model.to_dict(), "rows": rows})


if __name__ == "__main__":
    main()
