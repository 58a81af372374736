"""Running methods side by side on one generation setup and measuring each against the full sampler."""

from __future__ import annotations

import platform
import threading
from statistics import median

import numpy as np
import torch
from tqdm.auto import tqdm

from ..layers import denoiser
from ..pipelines.sampling import GenerationSetup
from ..pipelines.timing import device_name, timed
from ..search.utility import mean_psnr
from .methods import family, family_role, method
from .metrics import extra_scores, image_metrics

__all__ = ["MATCH_TOLERANCE", "matched_latency", "run_methods", "summarize", "compare_methods",
           "merge_runs", "environment"]

MATCH_TOLERANCE = 0.05  # latency ratios closer than this count as matched; farther pairs are reported as such


class _PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms), as bytes above the level at
    entry: the CPU counterpart of CUDA's max_memory_allocated."""

    def __enter__(self):
        import psutil

        self._process, self._stop = psutil.Process(), threading.Event()
        self.start = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.used = self.peak - self.start


def _timed_run(run, setup: GenerationSetup):
    """Images, seconds and peak memory (bytes above the start) of one generation of the whole prompt set."""
    device = setup.device
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        images, seconds = timed(lambda: run(setup), device)
        return images, seconds, torch.cuda.max_memory_allocated(device) - base
    with _PeakRSS() as memory:
        images, seconds = timed(lambda: run(setup), device)
    return images, seconds, memory.used


def matched_latency(rows: list[dict]) -> list[dict]:
    """For each method that is neither `full` nor step reduction, the step-reduced baseline whose measured latency
    is nearest, and the PSNR difference at that point (the paper's comparison: 20 steps with 10 reuse vs 13)."""
    baselines = [r for r in rows if family_role(r["family"]) == "baseline" and "latency_ratio" in r]
    pairs = []
    for row in rows:
        if family_role(row["family"]) in ("reference", "baseline") or "latency_ratio" not in row or not baselines:
            continue
        base = min(baselines, key=lambda b: abs(b["latency_ratio"] - row["latency_ratio"]))
        pairs.append({"method": row["method"], "latency_ratio": row["latency_ratio"], "baseline": base["method"],
                      "baseline_latency_ratio": base["latency_ratio"], "psnr_db": row["psnr_db"],
                      "baseline_psnr_db": base["psnr_db"], "psnr_gain_db": row["psnr_db"] - base["psnr_db"],
                      "matched": abs(row["latency_ratio"] - base["latency_ratio"]) <= MATCH_TOLERANCE})
    return pairs


def run_methods(setup: GenerationSetup, methods: list[str], repeats: int = 2, progress: bool = True,
                calibration: list[str] | None = None) -> tuple[dict, dict]:
    """Generate with every method: ({spec: {"images", "times", "memory", "info"}}, {spec: reason it could not
    run}). A warm-up round, then `repeats` timed rounds; every round runs every method once, so drift on a shared
    machine hits all alike. `calibration`: the prompts `phast:R` searches on (never `setup.prompts`); its search
    runs when the method is entered, outside the timed generation."""
    specs = ["full"] + [m for m in methods if m != "full"]
    runs = {spec: {"times": [], "memory": 0} for spec in specs}
    errors = {}
    bar = tqdm(total=(repeats + 1) * len(specs), desc="methods x rounds", disable=not progress, dynamic_ncols=True)
    for round_ in range(repeats + 1):
        for spec in specs:
            bar.update()
            if spec in errors:
                continue
            try:
                with method(setup, spec, calibration) as run:
                    images, seconds, memory = _timed_run(run, setup)
            except Exception as err:  # noqa: BLE001 - a method that fails is reported with its reason
                errors[spec] = f"{type(err).__name__}: {err}"
                continue
            runs[spec].update(images=images, info=run.info, memory=max(runs[spec]["memory"], memory))
            if round_ > 0:
                runs[spec]["times"].append(seconds / len(setup.prompts))
    bar.close()
    return runs, errors


def _row(spec: str, run: dict, reference, full_latency: float, prompts, extra_metrics, faithfulness) -> dict:
    images, latency = run["images"], median(run["times"])
    row = dict(method=spec, family=family(spec), latency_s=latency, latency_ratio=latency / full_latency,
               times_s=run["times"], peak_memory_mib=run["memory"] / 2**20, psnr_db=mean_psnr(images, reference),
               ssim=float(np.mean(image_metrics(images, reference)["ssim"])),
               **extra_scores(extra_metrics or {}, images, reference, prompts), **run.get("info", {}))
    if faithfulness is not None:
        row["faithfulness"] = faithfulness(images, prompts)
    return row


def summarize(runs: dict, errors: dict, prompts: list[str], faithfulness=None,
              extra_metrics: dict | None = None) -> dict:
    """Rows of figures per method against `full` (latency ratio, peak memory, PSNR, SSIM, faithfulness, the
    `load_extra_metrics` ones, the schedule a reuse method ran) and the matched-latency pairs."""
    if "full" in errors:
        raise RuntimeError(f"The reference (full) run failed: {errors['full']}")
    reference, full_latency = runs["full"]["images"], median(runs["full"]["times"])
    rows = [dict(method=spec, family=family(spec), error=errors[spec]) if spec in errors else
            _row(spec, runs[spec], reference, full_latency, prompts, extra_metrics, faithfulness)
            for spec in runs]
    return {"rows": rows, "matched": matched_latency(rows), "images": {s: runs[s].get("images") for s in runs}}


def compare_methods(setup: GenerationSetup, methods: list[str], repeats: int = 2, faithfulness=None,
                    progress: bool = True, calibration: list[str] | None = None,
                    extra_metrics: dict | None = None) -> dict:
    """Run `methods` (see `eval.methods.method`) on the same prompts and seeds and measure each against `full`
    (N steps, no reuse): latency per image (median of the timed rounds), peak memory, PSNR and SSIM against the
    reference images, `faithfulness(images, prompts)` where given (the default model's checker: a pass rate), and
    the extra metrics of `eval.metrics.load_extra_metrics`."""
    runs, errors = run_methods(setup, methods, repeats, progress, calibration)
    return summarize(runs, errors, setup.prompts, faithfulness, extra_metrics)


def merge_runs(shards: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """Runs of prompt shards (data-parallel processes, in prompt order) as one: images concatenated, timed
    per-image latencies pooled, peak memory the largest of any process."""
    errors = {k: v for _, shard_errors in shards for k, v in shard_errors.items()}
    runs = {}
    for spec in shards[0][0]:
        parts = [shard[spec] for shard, _ in shards]
        if spec in errors or any("images" not in p for p in parts):
            runs[spec] = {"times": [], "memory": 0}
            continue
        runs[spec] = {"images": np.concatenate([p["images"] for p in parts]), "info": parts[0].get("info", {}),
                      "times": [t for p in parts for t in p["times"]], "memory": max(p["memory"] for p in parts)}
    return runs, errors


def environment(pipe) -> dict:
    """The device and versions a report was measured with."""
    import diffusers
    import transformers

    model = denoiser(pipe)
    return {"device": device_name(model.device), "dtype": str(model.dtype), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
