"""The quick planner against the full search on the default model: cost and held-out quality per budget.

For each sampler and budget, the quick planner searches on the 8 calibration captions; its plan and the shipped
plan of the full search (attnreuse/default_model/plans/) are then evaluated side by side on 8 held-out captions
(`eval.compare_methods`: alternating timed rounds, medians, PSNR against the full sampler). Writes
docs/results/quick_planner.json and .md. Usage: python scripts/quick_vs_full.py [--samplers ddim,dpm++]
[--budgets 0.35,0.5,0.7,0.85] [--repeats 3] [--out docs/results/quick_planner]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from attnreuse import Plan
from attnreuse.default_model import DEFAULT_GUIDANCE, load_default_pipeline
from attnreuse.default_model.splits import CALIBRATION, EVALUATION, captions
from attnreuse.eval.runner import compare_methods
from attnreuse.files import atomic_write, write_json
from attnreuse.pipelines.sampling import GenerationSetup, use_sampler
from attnreuse.pipelines.timing import device_name
from attnreuse.search import quick_plan, shipped_plan


def one_budget(pipe, sampler: str, budget: float, repeats: int, folder: Path) -> dict:
    calibration = GenerationSetup(pipe, captions(8, CALIBRATION), None, 20, DEFAULT_GUIDANCE)
    quick = quick_plan(calibration, budget, progress=False, measure=False)
    quick_file = folder / f"quick-{sampler}-{budget:g}.json"
    quick.to_json(quick_file)
    shipped = shipped_plan(sampler, budget)
    full = Plan.from_json(shipped).meta
    held_out = GenerationSetup(pipe, captions(8, EVALUATION), None, 20, DEFAULT_GUIDANCE)
    rows = {r["method"]: r for r in compare_methods(held_out, ["full", str(quick_file), str(shipped)], repeats,
                                                    progress=False)["rows"]}
    q, s = rows[str(quick_file)], rows[str(shipped)]
    return {"sampler": sampler, "budget": budget, "quick_plan": str(quick),
            "quick": {"calls": quick.meta["denoiser_calls"], "profile_cached": quick.meta["profile_cached"],
                      "full_runs": quick.meta["full_runs"],
                      "search_s": quick.meta["search_s"], "calibration_psnr_db": quick.meta["psnr_db"],
                      "latency": q["latency_ratio"], "psnr_db": q["psnr_db"]},
            "full": {"calls": full["model_calls"], "full_runs": full["model_calls"] / 20,
                     "search_s": full["search_s"], "calibration_psnr_db": full["psnr_db"],
                     "latency": s["latency_ratio"], "psnr_db": s["psnr_db"]}}


def markdown(results: list[dict], device: str) -> str:
    lines = [f"Quick planner against the full search, default model, 20 steps, 8 calibration / 8 held-out captions; "
             f"{device}. Calls: denoiser calls that ran, over the calibration batch (the quick planner's include "
             "its profile where marked *, timed once per model, device and batch, then cached; the full search's "
             "exclude its profile of 22 kinds of call); runs: calls / 20.", "",
             "| sampler | budget | quick: calls (runs), s | full: calls (runs), s | quick: latency, held-out PSNR | "
             "full: latency, held-out PSNR | quick - full |", "|---|---|---|---|---|---|---|"]
    for r in results:
        q, f = r["quick"], r["full"]
        star = "" if q["profile_cached"] else "*"
        lines.append(f"| {r['sampler']} | {r['budget']:g} | {q['calls']}{star} ({q['full_runs']:.1f}), "
                     f"{q['search_s']:.0f} "
                     f"| {f['calls']} ({f['full_runs']:.0f}), {f['search_s']:.0f} | {q['latency']:.3f}x, "
                     f"{q['psnr_db']:.2f} dB | {f['latency']:.3f}x, {f['psnr_db']:.2f} dB | "
                     f"{q['psnr_db'] - f['psnr_db']:+.2f} dB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samplers", default="ddim,dpm++")
    parser.add_argument("--budgets", default="0.35,0.5,0.7,0.85")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/results/quick_planner")
    args = parser.parse_args()
    pipe = load_default_pipeline()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for sampler in args.samplers.split(","):
            use_sampler(pipe, sampler)
            for budget in (float(b) for b in args.budgets.split(",")):
                results.append(one_budget(pipe, sampler, budget, args.repeats, Path(folder)))
                print(markdown(results[-1:], "").splitlines()[-1], flush=True)
    device = device_name("cpu")
    write_json(Path(args.out).with_suffix(".json"), {"device": device, "results": results})
    text = markdown(results, device)
    atomic_write(Path(args.out).with_suffix(".md"), lambda tmp: tmp.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
