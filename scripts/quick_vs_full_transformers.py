"""The quick planner against the full search on the tiny random-weight transformer pipelines: cost and held-out quality.

For each architecture (tiny-pixart, tiny-sd3, tiny-flux; `pipelines.tiny.build_pipeline`, seed 0, each with its own
scheduler) and budget, the quick planner (`search.quick_plan`) and the full search (`search.search_plan`, stopped
after --time-limit seconds) both plan on 8 calibration prompts; their plans are then evaluated side by side on 8
held-out prompts (`eval.compare_methods`: alternating timed rounds, medians, PSNR against the full sampler). The
weights are random, so the images are noise-like; PSNR against the model's own full sampler still measures fidelity.
A planner that fails on an architecture has its error recorded in the row. Profiles are kept in a fresh temporary
$ATTNREUSE_CACHE, so nothing cached elsewhere is used. Writes docs/results/quick_planner_transformers.json and .md.
Usage: python scripts/quick_vs_full_transformers.py [--archs tiny-pixart,tiny-sd3,tiny-flux] [--budgets 0.5,0.7]
[--steps 20] [--repeats 3] [--time-limit 120] [--sweeps 30] [--out docs/results/quick_planner_transformers]
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from attnreuse.eval.runner import compare_methods
from attnreuse.files import atomic_write, write_json
from attnreuse.pipelines.sampling import GenerationSetup
from attnreuse.pipelines.timing import device_name
from attnreuse.pipelines.tiny import build_pipeline
from attnreuse.search import quick_plan, search_plan

GUIDANCE = 7.5  # the CLI's scale for every model but the shipped ones (attnreuse/cli/pipeline.py)
MACHINE = "CPU VM, AMD EPYC, 2 threads, shared"
# words of the tiny pipelines' tokenizers (pipelines.tiny.DEFAULT_WORDS), so that no prompt word is unknown
CALIBRATION = ["a red circle", "a blue square on the left", "a green triangle above a yellow circle",
               "a photo of a cat", "a small house with a tree", "a large purple shape at the center",
               "a white bird on a black car", "a painting of a flower"]
HELD_OUT = ["a yellow square", "an orange triangle on the right", "a gray circle below a red square",
            "a picture of a dog", "a big tree in the bottom left", "a blue car at the top",
            "a black cat with a white flower", "a photo of a small green bird"]


def _error(err: Exception, started: float) -> dict:
    """A planner's error, and the seconds it ran before it."""
    return {"error": f"{type(err).__name__}: {err}", "seconds": time.perf_counter() - started}


def plan_quick(calibration, budget: float, folder: Path, name: str) -> dict:
    """The quick planner's plan (written to `folder`) and its cost, or the error it stopped with."""
    started = time.perf_counter()
    try:
        plan = quick_plan(calibration, budget, progress=False, measure=False)
    except Exception as err:  # noqa: BLE001 - a planner that fails is recorded, and the next row goes on
        return _error(err, started)
    path = folder / f"quick-{name}.json"
    plan.to_json(path)
    m = plan.meta
    return {"file": str(path), "plan": str(plan), "calls": m["denoiser_calls"], "full_runs": m["full_runs"],
            "profile_cached": m["profile_cached"], "search_s": m["search_s"], "calibration_psnr_db": m["psnr_db"],
            "predicted_latency": m["predicted_latency"], "refreshes": m["refreshes"], "mode": m["mode"],
            "candidates": m["candidates"]}


def plan_full(calibration, budget: float, folder: Path, name: str, time_limit: float, sweeps: int) -> dict:
    """The full search's plan (written to `folder`) and its cost, or the error it stopped with."""
    started = time.perf_counter()
    try:
        plan = search_plan(calibration, budget, state_file=None, progress=False, time_limit=time_limit,
                           sweeps=sweeps, measure=False)
    except Exception as err:  # noqa: BLE001 - a planner that fails is recorded, and the next row goes on
        return _error(err, started)
    path = folder / f"full-{name}.json"
    plan.to_json(path)
    m = plan.meta
    return {"file": str(path), "plan": str(plan), "calls": m["model_calls"],
            "full_runs": m["model_calls"] / calibration.num_steps, "naive_calls": m["naive_model_calls"],
            "search_s": m["search_s"], "calibration_psnr_db": m["psnr_db"],
            "predicted_latency": m["predicted_latency"], "candidates": m["candidates"], "sweeps": len(m["history"]),
            "best_seed_psnr_db": m["best_seed_psnr_db"], "best_dp_psnr_db": m["best_dp_psnr_db"],
            "climb_gain_db": m["climb_gain_db"], "mode": m["mode"]}


def evaluate(held_out, planned: dict, repeats: int) -> None:
    """Adds each plan's measured latency ratio and held-out PSNR (against the full sampler) to its entry."""
    files = {key: entry["file"] for key, entry in planned.items() if "file" in entry}
    if not files:
        return
    rows = {r["method"]: r for r in compare_methods(held_out, ["full", *files.values()], repeats,
                                                    progress=False)["rows"]}
    for key, file in files.items():
        row = rows[file]
        if "error" in row:
            planned[key]["error"] = f"evaluation: {row['error']}"
            continue
        planned[key].update(latency=row["latency_ratio"], latency_s=row["latency_s"], psnr_db=row["psnr_db"],
                            ssim=row["ssim"], times_s=row["times_s"])
    planned["full_sampler"] = {"latency_s": rows["full"]["latency_s"], "times_s": rows["full"]["times_s"]}


def one_budget(pipe, arch: str, budget: float, args, folder: Path) -> dict:
    calibration = GenerationSetup(pipe, CALIBRATION, None, args.steps, GUIDANCE)
    name = f"{arch}-{budget:g}"
    planned = {"quick": plan_quick(calibration, budget, folder, name),
               "full": plan_full(calibration, budget, folder, name, args.time_limit, args.sweeps)}
    held_out = GenerationSetup(pipe, HELD_OUT, None, args.steps, GUIDANCE)
    evaluate(held_out, planned, args.repeats)
    for entry in planned.values():
        if isinstance(entry, dict):
            entry.pop("file", None)
    return {"arch": arch, "sampler": type(pipe.scheduler).__name__, "budget": budget, **planned}


def _side(entry: dict, steps: int) -> str:
    if "error" in entry:
        return f"error after {entry['seconds']:.0f} s: {entry['error']}".replace("|", "\\|")
    star = "" if entry.get("profile_cached", True) else "*"
    cost = f"{entry['calls']}{star} ({entry['calls'] / steps:.1f}), {entry['search_s']:.0f}"
    if "psnr_db" not in entry:
        return cost
    return f"{cost}, {entry['latency']:.3f}x, {entry['psnr_db']:.2f} dB"


def table_row(r: dict, steps: int) -> str:
    q, f = r["quick"], r["full"]
    gap = f"{q['psnr_db'] - f['psnr_db']:+.2f} dB" if "psnr_db" in q and "psnr_db" in f else "n/a"
    return f"| {r['arch']} | {r['budget']:g} | {_side(q, steps)} | {_side(f, steps)} | {gap} |"


def _load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def markdown(results: list[dict], info: dict) -> str:
    steps = info["steps"]
    samplers = ", ".join(dict.fromkeys(f"{r['arch']} {r['sampler']}" for r in results))
    lines = [f"Machine: {MACHINE} ({info['device']}; load average (1, 5, 15 min) "
             f"{_load(info['load_average_before'])} at the start, {_load(info['load_average_after'])} at the end). "
             f"Date: {info['date']}. Command: `{info['command']}`. Total {info['total_s'] / 60:.1f} min.", "",
             f"Quick planner against the full search (stopped after {info['time_limit']:g} s, at most "
             f"{info['sweeps']} sweeps) on the tiny random-weight transformer pipelines (seed 0, each with its own "
             f"scheduler: {samplers}), {steps} steps, guidance {GUIDANCE:g}, 8 calibration / 8 held-out prompts. "
             "Calls: denoiser calls that ran, each over the calibration batch (the quick planner's include its "
             "reference run, and its profile where marked *: timed once per model, device and batch, then cached "
             "in this run's fresh $ATTNREUSE_CACHE; the full search's exclude its reference run and its profile); "
             f"runs: calls / {steps}; s: planning seconds. Latency: measured on the held-out prompts as a ratio to "
             f"the full sampler (median of {info['repeats']} timed rounds); PSNR against the full sampler's images. "
             "The weights are random, so the images are noise-like: PSNR measures fidelity to the model's own "
             "full sampler, not image quality.", "",
             "| arch | budget | quick: calls (runs), s, latency, held-out PSNR | full: calls (runs), s, latency, "
             "held-out PSNR | quick - full |", "|---|---|---|---|---|"]
    lines += [table_row(r, steps) for r in results]
    full = [f"{r['arch']} {r['budget']:g}: {r['full_sampler']['latency_s'] * 1000:.0f}" for r in results
            if "full_sampler" in r]
    if full:
        lines += ["", f"The full sampler on the held-out prompts, ms per image (median), by row: {'; '.join(full)}. "
                  "Timed on a shared 2-core VM while other processes ran; a pipeline this small (tens of ms per "
                  "image, much of it outside the denoiser) gives latency ratios that move between runs."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="tiny-pixart,tiny-sd3,tiny-flux")
    parser.add_argument("--budgets", default="0.5,0.7")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds the full search may climb")
    parser.add_argument("--sweeps", type=int, default=30, help="the full search's most hill-climb sweeps")
    parser.add_argument("--out", default="docs/results/quick_planner_transformers")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a termination still removes the temporary folders
    started, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="attnreuse-cache-") as cache, tempfile.TemporaryDirectory() as folder:
        os.environ["ATTNREUSE_CACHE"] = cache  # before anything is planned: no profile cached elsewhere is used
        results = []
        for arch in args.archs.split(","):
            pipe = build_pipeline(arch, seed=0)
            for budget in (float(b) for b in args.budgets.split(",")):
                results.append(one_budget(pipe, arch, budget, args, Path(folder)))
                print(table_row(results[-1], args.steps), flush=True)
    info = {"device": device_name("cpu"), "date": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "command": f".venv/bin/python {shlex.join(sys.argv)}", "steps": args.steps, "repeats": args.repeats,
            "time_limit": args.time_limit, "sweeps": args.sweeps, "guidance": GUIDANCE, "machine": MACHINE,
            "calibration_prompts": CALIBRATION, "held_out_prompts": HELD_OUT,
            "total_s": time.perf_counter() - started, "load_average_before": load_before,
            "load_average_after": os.getloadavg()}
    write_outputs(Path(args.out), results, info)


def write_outputs(out: Path, results: list[dict], info: dict) -> None:
    write_json(out.with_suffix(".json"), {**info, "results": results})
    text = markdown(results, info)
    atomic_write(out.with_suffix(".md"), lambda tmp: tmp.write_text(text))
    print(text)
    print(f"total {info['total_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
