"""Soak: many generations on the default model, alternating sizes, modes, schedules, planning at first use (its
plan cache emptied every 50 generations, so it calibrates again) and injected faults, with the process's memory
and the cache checked as they go. Not part of CI; `bash scripts/soak.sh` runs it."""

import argparse
import gc
import os
import random
import shutil
import tempfile
import time

import psutil
import torch

from attnreuse import Schedule, apply_attention_reuse, apply_reuse
from attnreuse.default_model import load_default_pipeline


class Injected(Exception):
    """A fault raised from a step callback on purpose."""


def _schedules(steps: int) -> list[Schedule]:
    rng = random.Random(0)
    picks = [Schedule.hurry(steps, steps // 2), Schedule.all_compute(steps)]
    for _ in range(6):
        picks.append(Schedule([1] + [rng.randint(0, 1) for _ in range(steps - 1)]))
    return picks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--every", type=int, default=100, help="report every this many generations")
    parser.add_argument("--json", default="runs/soak.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    os.environ["ATTNREUSE_CACHE"] = cache = tempfile.mkdtemp(prefix="attnreuse-soak-")
    pipe, process = load_default_pipeline(), psutil.Process()
    schedules, modes, sizes = _schedules(args.steps), ("map", "qk", "output", "auto"), (64, 32)
    rows, faults, start = [], 0, time.perf_counter()
    for g in range(1, args.generations + 1):
        schedule, mode, size = schedules[g % len(schedules)], modes[g % len(modes)], sizes[(g // 7) % len(sizes)]
        fail_at = (g * 5) % args.steps if g % 9 == 0 else None

        def callback(p, i, t, kwargs, fail_at=fail_at, g=g):
            if i == fail_at:
                raise Injected(f"generation {g}, step {i}")
            return kwargs

        if g % 50 == 0:
            shutil.rmtree(cache, ignore_errors=True)
        if g % 4 == 0:  # planning at first use: calibrates, or follows its plan
            applied = apply_reuse(pipe, budget=(0.5, 0.7)[(g // 4) % 2])
        else:
            applied = apply_attention_reuse(pipe, schedule, mode=mode, max_cache_bytes=None if g % 5 else 2**20)
        with applied as handle:
            try:
                pipe("a red circle left of a blue square", num_inference_steps=args.steps, height=size, width=size,
                     guidance_scale=4.5, generator=torch.Generator().manual_seed(g), output_type="np",
                     callback_on_step_end=callback)
            except Injected:
                faults += 1
            left = handle.stats()["cache_bytes"]
        if left:
            raise SystemExit(f"generation {g}: {left} bytes left in the cache after the generation")
        if g % args.every == 0:
            gc.collect()
            rss = process.memory_info().rss
            rows.append({"generation": g, "rss_mib": rss / 2**20, "cache_bytes": left, "faults": faults,
                         "seconds": time.perf_counter() - start})
            print(f"generation {g:5d}: RSS {rss / 2**20:8.1f} MiB, cache {left} bytes, {faults} injected faults, "
                  f"{time.perf_counter() - start:6.0f} s", flush=True)
    growth = rows[-1]["rss_mib"] / rows[0]["rss_mib"] - 1
    verdict = "flat" if abs(growth) <= 0.05 else "GROWING"
    print(f"RSS at generation {rows[-1]['generation']} against {rows[0]['generation']}: {growth:+.1%} ({verdict})")
    from attnreuse.files import write_json

    write_json(args.json, {"steps": args.steps, "rows": rows, "rss_growth": growth, "verdict": verdict})
    shutil.rmtree(cache, ignore_errors=True)
    return 0 if verdict == "flat" else 1


if __name__ == "__main__":
    raise SystemExit(main())
