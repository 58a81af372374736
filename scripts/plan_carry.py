"""How far a plan carries (issue 25, part 4): what a quick plan searched for one setting loses at another.

For each default model (the UNet and the DiT one) the quick planner searches a base plan once: DDIM, 20 steps,
guidance 4.5, the model's own resolution, the 8 calibration captions in one batch. Each moved setting B changes one
thing (steps, guidance, sampler, resolution, batch, prompts). On B the base plan, moved there as `apply_reuse`
moves it (by timestep where the call count differs, call by call where it is the same), and a quick plan searched
natively on B with the same budget are both scored by one `Evaluator` of B (mean PSNR against B's full sampler) and
their latency predicted with B's latency model (the native plan's). A row "carries" when the moved plan is within
1 dB of the native one. The batch row has its own base: one caption (batch 1), moved to four (batch 4).
Writes docs/results/plan_carry.json and .md. Usage: python scripts/plan_carry.py [--models unet,dit]
[--budgets 0.5] [--settings steps30,steps50,guidance7.5,dpm++,resolution,batch4,prompts]
[--out docs/results/plan_carry] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from attnreuse.default_model import DEFAULT_GUIDANCE, load_default_pipeline
from attnreuse.default_model.splits import CALIBRATION, EVALUATION, captions
from attnreuse.files import atomic_write, write_json
from attnreuse.layers import denoiser
from attnreuse.pipelines.sampling import GenerationSetup, use_sampler
from attnreuse.pipelines.timing import device_name
from attnreuse.plan import Plan, Unit
from attnreuse.search import Levels, quick_plan
from attnreuse.search.evaluator import Evaluator
from attnreuse.search.latency import LatencyModel
from attnreuse.search.quick import QuickSearch

CARRY_DB = 1.0  # a moved plan carries when it is at most this far below the native one


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a plan is searched for besides the model and budget; `scale` multiplies the latent side."""

    steps: int = 20
    guidance: float = DEFAULT_GUIDANCE
    sampler: str = "ddim"
    scale: float = 1.0
    split: int = CALIBRATION
    count: int = 8

    def describe(self) -> str:
        split = "calibration" if self.split == CALIBRATION else "evaluation"
        return (f"{self.sampler} {self.steps} steps, guidance {self.guidance:g}, {self.scale:g}x side, "
                f"{self.count} {split} caption{'s' if self.count > 1 else ''}")


BASE = Setting()
MOVES = {  # name: (label, base setting A, moved setting B)
    "steps30": ("steps 20 -> 30", BASE, dataclasses.replace(BASE, steps=30)),
    "steps50": ("steps 20 -> 50", BASE, dataclasses.replace(BASE, steps=50)),
    "guidance7.5": ("guidance 4.5 -> 7.5", BASE, dataclasses.replace(BASE, guidance=7.5)),
    "dpm++": ("sampler ddim -> dpm++", BASE, dataclasses.replace(BASE, sampler="dpm++")),
    "resolution": ("resolution 64 -> 128 px", BASE, dataclasses.replace(BASE, scale=2.0)),
    "batch4": ("batch 1 -> 4", dataclasses.replace(BASE, count=1), dataclasses.replace(BASE, count=4)),
    "prompts": ("calibration -> evaluation captions", BASE, dataclasses.replace(BASE, split=EVALUATION)),
}


@contextlib.contextmanager
def applied(pipe, setting: Setting):
    """The setup of `setting` on `pipe`: its sampler swapped in and its denoiser's `sample_size` (which sets the
    pipeline's default image size and the evaluator's latents) scaled; both put back on leaving."""
    model, scheduler = denoiser(pipe), pipe.scheduler
    side = model.config.sample_size
    use_sampler(pipe, setting.sampler)
    model.register_to_config(sample_size=int(round(side * setting.scale)))
    try:
        yield GenerationSetup(pipe, captions(setting.count, setting.split), None, setting.steps, setting.guidance)
    finally:
        pipe.scheduler = scheduler
        model.register_to_config(sample_size=side)


def moved_to(plan, timesteps):
    """The plan as `apply_reuse` runs it on a generation of these timesteps: as it is for as many calls, else moved
    by timestep (the tracker's rule for a one-call-per-step sampler)."""
    return plan if len(plan) == len(timesteps) else plan.for_timesteps([float(t) for t in timesteps])


def predicted(plan, latency: LatencyModel) -> float:
    """A whole-call plan's latency under `latency`, as `quick_plan` predicts it: a computed call costs 1, a reused
    one the profile's whole-call reuse, plus the fixed cost."""
    top = latency.levels - 1
    bits = plan.units["call"].bits
    return latency.predict([0 if b else top for b in bits], ["compute"] * len(bits))


def plan_info(plan, psnr_db: float, latency: LatencyModel) -> dict:
    bits = plan.units["call"].bits
    return {"plan": str(plan), "mode": plan.units["call"].mode, "psnr_db": psnr_db,
            "predicted_latency": predicted(plan, latency), "computed_calls": sum(bits),
            "computed_fraction": sum(bits) / len(bits)}


def search(pipe, setting: Setting, budget: float):
    """The quick plan of `setting` at `budget`, and the seconds it took."""
    with applied(pipe, setting) as setup:
        started = time.perf_counter()
        plan = quick_plan(setup, budget, progress=False, measure=False)
    return plan, time.perf_counter() - started


def same_calls(setup, evaluator: Evaluator, latency: LatencyModel, calls: int):
    """The quick planner's best verified plan on B with exactly `calls` computed calls (its refresh count fixed, not
    fitted to the budget): B's native plan at the moved plan's cost."""
    search = QuickSearch(setup, evaluator, Levels.of(denoiser(setup.pipe)), latency)
    found, utilities = search.verified(calls)
    best = max(range(len(found)), key=lambda k: utilities[k])
    bits = tuple(0 if lv == found[best].top else 1 for lv in found[best].levels)
    return Plan({"call": Unit("call", bits, found[best].mode)}), utilities[best]


def one_row(pipe, name: str, base, budget: float) -> dict:
    """A moved setting: the base plan moved to B against B's native quick plan (and B's plan of as many computed
    calls as the moved one), all scored by one evaluator of B."""
    label, _, setting = MOVES[name]
    native, native_s = search(pipe, setting, budget)
    latency = LatencyModel.from_dict(native.meta["latency_model"])
    with applied(pipe, setting) as setup:
        started = time.perf_counter()
        evaluator = Evaluator(setup, record=True)
        moved = moved_to(base, evaluator.timesteps)
        moved_db, native_db = evaluator([moved, native])
        matched, matched_db = same_calls(setup, evaluator, latency, sum(moved.units["call"].bits))
        evaluate_s = time.perf_counter() - started
    row = {"setting": name, "label": label, "b": dataclasses.asdict(setting), "b_text": setting.describe(),
           "moved": plan_info(moved, moved_db, latency), "native": plan_info(native, native_db, latency),
           "native_same_calls": plan_info(matched, matched_db, latency),
           "native_meta": {k: native.meta[k] for k in ("psnr_db", "predicted_latency", "refreshes",
                                                        "profile_cached", "denoiser_calls", "search_s")},
           "latency_model": native.meta["latency_model"], "native_search_s": native_s, "evaluate_s": evaluate_s}
    row["difference_db"] = moved_db - native_db
    row["difference_same_calls_db"] = moved_db - matched_db
    row["moved_over_budget"] = bool(row["moved"]["predicted_latency"] > budget)
    row["carries"] = bool(moved_db >= native_db - CARRY_DB)
    return row


def one_model(model: str, budget: float, names: list[str]) -> dict:
    """The base plans of one model (one per distinct base setting) and a row per moved setting."""
    pipe = load_default_pipeline(None if model == "unet" else model)
    bases, rows = {}, []
    for name in names:
        base_setting = MOVES[name][1]
        if base_setting not in bases:
            plan, seconds = search(pipe, base_setting, budget)
            bases[base_setting] = {"setting": dataclasses.asdict(base_setting), "text": base_setting.describe(),
                                   "plan": plan, "search_s": seconds}
            print(f"{model} budget {budget:g}: base plan for {base_setting.describe()}: {plan} "
                  f"({plan.meta['psnr_db']:.2f} dB, predicted {plan.meta['predicted_latency']:.3f}x, "
                  f"{seconds:.0f} s)", flush=True)
        row = dict(one_row(pipe, name, bases[base_setting]["plan"], budget), model=model, budget=budget,
                   a_text=base_setting.describe())
        rows.append(row)
        print(table_row(row), f"({row['native_search_s'] + row['evaluate_s']:.0f} s)", flush=True)
    plans = [dict(b, plan=str(b["plan"]), meta=b["plan"].meta) for b in bases.values()]
    return {"model": model, "budget": budget, "base_plans": plans, "rows": rows}


def table_row(r: dict) -> str:
    m, n, s, steps = r["moved"], r["native"], r["native_same_calls"], r["b"]["steps"]
    over = " (over budget)" if r["moved_over_budget"] else ""
    return (f"| {r['model']} | {r['budget']:g} | {r['label']} | {m['psnr_db']:.2f} dB, {m['predicted_latency']:.3f}x"
            f"{over}, {m['computed_calls']}/{steps} | {n['psnr_db']:.2f} dB, {n['predicted_latency']:.3f}x, "
            f"{n['computed_calls']}/{steps} | {r['difference_db']:+.2f} dB | {s['psnr_db']:.2f} dB "
            f"({r['difference_same_calls_db']:+.2f} dB) | {'carries' if r['carries'] else 're-plan'} |")


NOTES = [
    "Moved: the base plan searched at A, run at B as `apply_reuse` runs it (moved by timestep where B has another "
    "call count, call by call where it has as many); native: a quick plan searched at B with the same budget. "
    "Both are scored by one evaluator of B: mean PSNR of the 8 (batch row: 4) images against B's full sampler. "
    "Predicted latency: both plans' calls priced by B's latency model (the native plan's profile: a computed call "
    "1, a reused call the profiled whole-call reuse, plus B's fixed cost), as a ratio to B's full sampler; "
    "computed: calls that run the model, of B's steps. Carries: moved >= native - 1 dB. "
    "Native at moved's calls: the quick planner's verified plan on B with the refresh count set to the moved "
    "plan's computed calls instead of fitted to the budget (a moved plan can compute more or fewer calls than the "
    "budget buys at B: moving by nearest timestep repeats or drops entries), so that the two compare at one cost.",
    "Batch: the evaluator and the quick planner run a setup's prompts as one batch, so batch = number of prompts. "
    "The batch row therefore has its own base, searched on the first calibration caption alone (batch 1), and moves "
    "it to the first four (batch 4, the base caption among them); its native plan is searched on those four. "
    "Images of a batch are computed independently, so what changes is which images the plan was tuned on and the "
    "latency profile (timed per batch: how many refreshes fit the budget).",
    "Prompts: the native plan is searched on the 8 evaluation captions it is then scored on (in-sample), the moved "
    "one on the calibration captions (held-out), so this row is the price of not re-planning on the very prompts "
    "served. Resolution: the denoiser's `sample_size` doubled (16 -> 32 latent, 64 -> 128 px), which sets the "
    "pipeline's default size and the evaluator's latents; neither model was trained at 128 px.",
    "Latency models are timed during the run (the reused-call profile is cached per model, device, threads, batch "
    "and resolution; the fixed cost is timed at every search), so on a shared machine a native plan's refresh "
    "count can move by one between runs; the column at the moved plan's calls does not depend on it. Torch runs on "
    "one thread (`--threads`): with two, another process on the two cores stalls every parallel region.",
]


def markdown(results: list[dict], device: str, command: str, total_s: float | None = None) -> str:
    lines = [f"How far a quick plan carries: a plan searched at setting A, moved to B, against a plan searched at B; "
             f"{device}, a CPU VM (AMD EPYC, 2 cores shared with other work). Command: `{command}`"
             + (f"; {total_s / 60:.1f} min in all." if total_s is not None else "."), ""]
    for result in results:
        for base in result["base_plans"]:
            meta = base["meta"]
            lines.append(f"- {result['model']}, budget {result['budget']:g}, base A = {base['text']}: "
                         f"`{base['plan']}` ({meta['mode']}; {meta['psnr_db']:.2f} dB on A, predicted "
                         f"{meta['predicted_latency']:.3f}x; searched in {base['search_s']:.0f} s)")
    lines += ["", "| model | budget | A -> B | moved: PSNR, pred. latency, computed | native: PSNR, pred. latency, "
              "computed | moved - native | native at moved's calls (moved - it) | within 1 dB |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [table_row(r) for result in results for r in result["rows"]]
    lines += [""] + [f"{note}\n" for note in NOTES]
    return "\n".join(lines)


def command_line() -> str:
    niceness = os.nice(0)
    return (f"nice -n {niceness} " if niceness else "") + shlex.join([".venv/bin/python", *sys.argv])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="unet,dit")
    parser.add_argument("--budgets", default="0.5")
    parser.add_argument("--settings", default=",".join(MOVES))
    parser.add_argument("--out", default="docs/results/plan_carry")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine's other load "
                        "stalls two threads at every barrier; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.settings.split(",")
    unknown = sorted(set(names) - set(MOVES))
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {list(MOVES)}")
    started, results, device, command = time.perf_counter(), [], device_name("cpu"), command_line()
    for model in args.models.split(","):
        for budget in (float(b) for b in args.budgets.split(",")):
            results.append(one_model(model, budget, names))
            total_s = time.perf_counter() - started
            write_json(Path(args.out).with_suffix(".json"), {"device": device, "command": command,
                                                             "total_s": total_s, "carry_db": CARRY_DB,
                                                             "results": results})
    text = markdown(results, device, command, total_s)
    atomic_write(Path(args.out).with_suffix(".md"), lambda tmp: tmp.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
