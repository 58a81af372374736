"""Planning at first use on the default model: what it keeps and what it costs, beside the quick planner and the
shipped plans of the full search.

For each sampler and budget, `apply_reuse(pipe, budget=B)` calibrates on one pipeline call (the 8 calibration
captions in one batch, and, as a user's first prompt would, the first caption alone), and the quick planner plans
on the same 8 captions. The plans are then evaluated side by side on 8 held-out captions (`eval.compare_methods`:
alternating timed rounds, medians, PSNR against the full sampler). Writes docs/results/first_use.json and .md.
Usage: python scripts/first_use_quality.py [--samplers ddim,dpm++] [--budgets 0.35,0.5,0.7,0.85] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from attnreuse import Plan, apply_reuse
from attnreuse.default_model import DEFAULT_GUIDANCE, load_default_pipeline
from attnreuse.default_model.splits import CALIBRATION, EVALUATION, captions
from attnreuse.eval.runner import compare_methods
from attnreuse.files import atomic_write, read_json, write_json
from attnreuse.pipelines.sampling import GenerationSetup, use_sampler
from attnreuse.pipelines.timing import device_name
from attnreuse.search import quick_plan, shipped_plan


def first_use_plan(setup: GenerationSetup, budget: float, path: Path) -> dict:
    """Calibrate on one generation of `setup` under `apply_reuse(budget=)`; the plan written to `path`."""
    with apply_reuse(setup.pipe, budget=budget) as handle:
        setup.generate()
        stats = handle.stats()
    plan = Plan.from_json(read_json(stats["plan_file"])["plan"])
    plan.to_json(path)
    return {"plan": str(plan), "predicted_latency": plan.meta["predicted_latency"], "planning_s":
            plan.meta["planning_s"], "predicted_latent_psnr_db": plan.meta["predicted_latent_psnr_db"]}


def one_budget(pipe, sampler: str, budget: float, repeats: int, folder: Path) -> dict:
    calibration = GenerationSetup(pipe, captions(8, CALIBRATION), None, 20, DEFAULT_GUIDANCE)
    files = {name: folder / f"{name}-{sampler}-{budget:g}.json" for name in ("first8", "first1", "quick")}
    found = {"first8": first_use_plan(calibration, budget, files["first8"]),
             "first1": first_use_plan(calibration.subset([0]), budget, files["first1"])}
    quick = quick_plan(calibration, budget, progress=False, measure=False)
    quick.to_json(files["quick"])
    found["quick"] = {"plan": str(quick), "predicted_latency": quick.meta["predicted_latency"],
                      "planning_s": quick.meta["search_s"], "full_runs": quick.meta["full_runs"]}
    files["full"] = shipped_plan(sampler, budget)
    found["full"] = {"plan": str(Plan.from_json(files["full"])), "planning_s": Plan.from_json(files["full"]).meta[
        "search_s"]}
    held_out = GenerationSetup(pipe, captions(8, EVALUATION), None, 20, DEFAULT_GUIDANCE)
    rows = {r["method"]: r for r in compare_methods(held_out, ["full"] + [str(f) for f in files.values()], repeats,
                                                    progress=False)["rows"]}
    for name, file in files.items():
        found[name].update(latency=rows[str(file)]["latency_ratio"], psnr_db=rows[str(file)]["psnr_db"])
    return {"sampler": sampler, "budget": budget, **found}


NAMES = {"first8": "first use, 8 captions", "first1": "first use, 1 caption", "quick": "quick planner",
         "full": "full search (shipped)"}


def markdown(results: list[dict], device: str, command: str) -> str:
    lines = [f"Planning at first use against the quick planner and the full search: default model, 20 steps, "
             f"guidance {DEFAULT_GUIDANCE}; plans made on the calibration captions, latency (measured, alternating "
             f"rounds, medians) and PSNR against the full sampler on 8 held-out captions; {device}. "
             f"Command: `{command}`. Planning s: the time to make the plan after its calibration generation "
             "(first use), or the whole search.", "",
             "| sampler | budget | " + " | ".join(f"{n}: latency, PSNR, planning s" for n in NAMES.values()) + " |",
             "|---|---|" + "---|" * len(NAMES)]
    for r in results:
        cells = [f"{r[k]['latency']:.3f}x, {r[k]['psnr_db']:.2f} dB, {r[k]['planning_s']:.1f}" for k in NAMES]
        lines.append(f"| {r['sampler']} | {r['budget']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samplers", default="ddim,dpm++")
    parser.add_argument("--budgets", default="0.35,0.5,0.7,0.85")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/results/first_use")
    parser.add_argument("--update", action="store_true", help="replace these rows of an earlier output, keep the rest "
                                                              "(a row whose timing a busy machine spoiled)")
    args = parser.parse_args()
    pipe, results = load_default_pipeline(), []
    with tempfile.TemporaryDirectory() as folder:
        os.environ["ATTNREUSE_CACHE"] = folder  # every plan made here, none read from an earlier run
        for sampler in args.samplers.split(","):
            use_sampler(pipe, sampler)
            for budget in (float(b) for b in args.budgets.split(",")):
                results.append(one_budget(pipe, sampler, budget, args.repeats, Path(folder)))
                print(markdown(results[-1:], "", "").splitlines()[-1], flush=True)
    device = device_name("cpu")
    command = "python scripts/first_use_quality.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k not in ("out", "update"))
    if args.update:
        earlier = read_json(Path(args.out).with_suffix(".json"))
        fresh = {(r["sampler"], r["budget"]): r for r in results}
        results = [fresh.pop((r["sampler"], r["budget"]), r) for r in earlier["results"]] + list(fresh.values())
        command = f"{earlier['command']}, then {command} --update"
    write_json(Path(args.out).with_suffix(".json"), {"device": device, "command": command, "results": results})
    text = markdown(results, device, command)
    atomic_write(Path(args.out).with_suffix(".md"), lambda tmp: tmp.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
