"""Generating held-out captions and measuring prompt following and fidelity (grows with the evaluation issue)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm

from .faithfulness import check
from .shapes import sample

__all__ = ["held_out_captions", "generate", "faithfulness", "image_grid"]

CAPTION_OFFSET = 2_000_003  # held-out captions come from items of seed + this, never trained on


def held_out_captions(count: int, two_shapes: bool, seed: int = 0) -> list[str]:
    """`count` captions of the grammar (one or two shapes) drawn from items the training never saw."""
    return [sample(seed + CAPTION_OFFSET, i, two_shapes)[1] for i in range(count)]


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], batch_size: int = 50, progress: bool = False,
             **kwargs) -> np.ndarray:
    """Images (N, H, W, 3) uint8 for prompts and per-image seeds, in batches (each image its own generator)."""
    device = pipe.unet.device
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator(device).manual_seed(s) for s in seeds[chunk]]
        images = pipe(prompts[chunk], generator=generators, output_type="np", **kwargs).images
        out.append(np.clip(np.rint(np.asarray(images) * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def faithfulness(images: np.ndarray, prompts: list[str]) -> dict:
    """Pass rate of the faithfulness checker, overall and per part (color, shape, size, position, relation)."""
    results = [check(image, prompt) for image, prompt in zip(images, prompts)]
    parts = Counter()
    stated = Counter()
    for r in results:
        for part in ("color", "shape", "size", "position", "relation", "count"):
            if r[part] is not None:
                stated[part] += 1
                parts[part] += r[part]
    return {"pass_rate": float(np.mean([r["ok"] for r in results])), "n": len(results),
            "parts": {p: parts[p] / stated[p] for p in stated}, "passed": [r["ok"] for r in results]}


def image_grid(images: np.ndarray, columns: int = 8, upscale: int = 2, pad: int = 2):
    """A PIL image of a grid of (N, H, W, 3) uint8 images, enlarged `upscale` times (nearest) to be seen."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
    grid = Image.fromarray(canvas)
    return grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)


PRESETS = {  # --methods shorthands; the paper's ranges: r 4..12 of 20, K 10..18 steps
    "quick": "full,steps:10,steps:13,steps:16,hurry:6,hurry:10,deepcache:3,tgate:10,tome:0.5,pab:2,taylorseer:5",
    "paper": ",".join(["full"] + [f"steps:{k}" for k in range(10, 19, 2)] + [f"hurry:{r}" for r in range(4, 13, 2)]
                     + ["deepcache:2", "deepcache:3", "deepcache:5", "tgate:10", "tome:0.5", "pab:2", "taylorseer:5"]),
}


class _PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms), as bytes above the level at
    entry: the CPU counterpart of CUDA's max_memory_allocated."""

    def __enter__(self):
        import threading

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


def _timed_run(run, prompts, seeds, device):
    """Images, seconds and peak memory (bytes above the start) of one generation of the whole prompt set."""
    from .sampling import timed

    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        images, seconds = timed(lambda: run(prompts, generators), device)
        return images, seconds, torch.cuda.max_memory_allocated(device) - base
    with _PeakRSS() as memory:
        images, seconds = timed(lambda: run(prompts, generators), device)
    return images, seconds, memory.used


EXTRA_COLUMNS = {"clip_score": "CLIP score", "lpips": "LPIPS", "fid": "FID"}  # opt-in, see metrics.load_extra_metrics
MATCH_TOLERANCE = 0.05  # latency ratios closer than this count as matched; farther pairs are reported as such


def matched_latency(rows: list[dict]) -> list[dict]:
    """For each method that is neither `full` nor step reduction, the step-reduced baseline whose measured latency
    is nearest, and the PSNR difference at that point (the paper's comparison: 20 steps with 10 reuse vs 13)."""
    baselines = [r for r in rows if r["family"] == "steps" and "latency_ratio" in r]
    pairs = []
    for row in rows:
        if row["family"] in ("full", "steps") or "latency_ratio" not in row or not baselines:
            continue
        base = min(baselines, key=lambda b: abs(b["latency_ratio"] - row["latency_ratio"]))
        pairs.append({"method": row["method"], "latency_ratio": row["latency_ratio"], "baseline": base["method"],
                      "baseline_latency_ratio": base["latency_ratio"], "psnr_db": row["psnr_db"],
                      "baseline_psnr_db": base["psnr_db"], "psnr_gain_db": row["psnr_db"] - base["psnr_db"],
                      "matched": abs(row["latency_ratio"] - base["latency_ratio"]) <= MATCH_TOLERANCE})
    return pairs


def run_methods(pipe, prompts: list[str], seeds: list[int], methods: list[str], num_steps: int = 20,
                guidance_scale: float = 7.5, repeats: int = 2, progress: bool = True,
                calibration: list[str] | None = None) -> tuple[dict, dict]:
    """Generate with every method: ({spec: {"images", "times", "memory", "info"}}, {spec: reason it could not
    run}). A warm-up round, then `repeats` timed rounds; every round runs every method once, so drift on a shared
    machine hits all alike. `calibration`: the prompts `phast:R` searches on (never `prompts`); its search runs
    when the method is entered, outside the timed generation."""
    from .peers import method

    device = pipe.unet.device
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
                with method(pipe, spec, num_steps, guidance_scale, calibration) as run:
                    images, seconds, memory = _timed_run(run, prompts, seeds, device)
                runs[spec]["info"] = getattr(run, "info", {})
            except Exception as err:  # noqa: BLE001 - a method that fails is reported with its reason
                errors[spec] = f"{type(err).__name__}: {err}"
                continue
            runs[spec]["images"], runs[spec]["memory"] = images, max(runs[spec]["memory"], memory)
            if round_ > 0:
                runs[spec]["times"].append(seconds / len(prompts))
    bar.close()
    return runs, errors


def summarize(runs: dict, errors: dict, prompts: list[str], check_faithfulness: bool = False,
              extra_metrics: dict | None = None) -> dict:
    """Rows of figures per method against `full` (latency ratio, peak memory, PSNR, SSIM, faithfulness, the
    `load_extra_metrics` ones, the schedule a reuse method ran) and the matched-latency pairs."""
    from statistics import median

    from .metrics import extra_scores, image_metrics
    from .peers import family
    from .search import PSNR_CAP

    if "full" in errors:
        raise RuntimeError(f"The reference (full) run failed: {errors['full']}")
    reference = runs["full"]["images"]
    rows = []
    for spec in runs:
        row = {"method": spec, "family": family(spec)}
        if spec in errors:
            rows.append(dict(row, error=errors[spec]))
            continue
        images = runs[spec]["images"]
        scores = image_metrics(images, reference)
        latency = median(runs[spec]["times"])
        row.update(latency_s=latency, latency_ratio=latency / median(runs["full"]["times"]),
                   times_s=runs[spec]["times"], peak_memory_mib=runs[spec]["memory"] / 2**20,
                   psnr_db=float(np.mean([min(v, PSNR_CAP) for v in scores["psnr_db"]])),
                   ssim=float(np.mean(scores["ssim"])), **extra_scores(extra_metrics or {}, images, reference, prompts),
                   **runs[spec].get("info", {}))
        if check_faithfulness:
            row["faithfulness"] = faithfulness((images * 255).round().astype(np.uint8), prompts)["pass_rate"]
        rows.append(row)
    return {"rows": rows, "matched": matched_latency(rows), "images": {s: runs[s].get("images") for s in runs}}


def compare_methods(pipe, prompts: list[str], seeds: list[int], methods: list[str], num_steps: int = 20,
                    guidance_scale: float = 7.5, repeats: int = 2, check_faithfulness: bool = False,
                    progress: bool = True, calibration: list[str] | None = None,
                    extra_metrics: dict | None = None) -> dict:
    """Run `methods` (see `attnreuse.peers.method`) on the same prompts and seeds and measure each against
    `full` (N steps, no reuse): latency per image (median of the timed rounds), peak memory, PSNR and SSIM
    against the reference images, the faithfulness checker's pass rate on the default model's captions, and the
    extra metrics of `attnreuse.metrics.load_extra_metrics`."""
    runs, errors = run_methods(pipe, prompts, seeds, methods, num_steps, guidance_scale, repeats, progress,
                               calibration)
    return summarize(runs, errors, prompts, check_faithfulness, extra_metrics)


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


def _environment(pipe) -> dict:
    import platform

    import diffusers
    import transformers

    from .sampling import device_name

    return {"device": device_name(pipe.unet.device), "dtype": str(pipe.unet.dtype), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def write_report(result: dict, out, settings: dict, pipe, prompts: list[str], columns: int = 6) -> dict:
    """`eval.json` (every figure, the settings and the environment), `eval.md` (table and matched-latency
    pairs), `pareto.png` (latency relative to full against PSNR, one curve per family) and `grid.png` (the first
    `columns` prompts, one row per method)."""
    import json
    from pathlib import Path

    from .analysis import _pyplot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"settings": settings, "environment": _environment(pipe), "prompts": prompts,
              "rows": result["rows"], "matched": result["matched"]}
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    extras = [m for m in EXTRA_COLUMNS if any(m in r for r in result["rows"])]
    lines = [f"{settings['sampler']} {settings['num_steps']} steps, guidance {settings['guidance_scale']}, "
             f"{len(prompts)} prompts x seeds, {report['environment']['device']}", "",
             "| method | latency vs full | latency / image (s) | peak memory (MiB) | PSNR (dB) | SSIM | faithfulness |"
             + "".join(f" {EXTRA_COLUMNS[m]} |" for m in extras), "|---|---|---|---|---|---|---|" + "---|" * len(extras)]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | not run: {r['error'][:120]} | | | | | |" + " |" * len(extras))
            continue
        faith = f"{100 * r['faithfulness']:.0f}%" if "faithfulness" in r else ""
        lines.append(f"| {r['method']} | {r['latency_ratio']:.2f}x | {r['latency_s']:.3f} | {r['peak_memory_mib']:.0f} | "
                     f"{r['psnr_db']:.2f} | {r['ssim']:.4f} | {faith} |" + "".join(f" {r[m]:.4g} |" for m in extras))
    searched = [r for r in result["rows"] if "schedule_file" in r]
    if searched:
        lines += ["", "Searched schedules (1 = compute; calibration prompts never evaluated here): "
                  + "; ".join(f"{r['method']} `{r['schedule']}` ({r['schedule_file']})" for r in searched)]
    if result["matched"]:
        lines += ["", f"Matched latency (nearest step-reduced baseline by measured latency; 'no' where the latencies "
                  f"differ by more than {MATCH_TOLERANCE:.2f} of full):", "",
                  "| method | latency | baseline | its latency | matched | PSNR | baseline PSNR | gain (dB) |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {m['method']} | {m['latency_ratio']:.2f}x | {m['baseline']} | {m['baseline_latency_ratio']:.2f}x | "
                  f"{'yes' if m['matched'] else 'no'} | {m['psnr_db']:.2f} | {m['baseline_psnr_db']:.2f} | "
                  f"{m['psnr_gain_db']:+.2f} |" for m in result["matched"]]
    (out / "eval.md").write_text("\n".join(lines) + "\n")

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = {}
    for r in result["rows"]:
        if "error" not in r and r["family"] != "full":
            families.setdefault(r["family"], []).append(r)
    for name, rows in families.items():
        rows = sorted(rows, key=lambda r: r["latency_ratio"])
        ax.plot([r["latency_ratio"] for r in rows], [r["psnr_db"] for r in rows], "o-", label=name)
        for r in rows:
            label = Path(r["method"]).stem if r["method"].endswith(".json") else r["method"].split(":")[-1]
            ax.annotate(label, (r["latency_ratio"], r["psnr_db"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="latency relative to full (lower is faster)", ylabel="PSNR vs full (dB)",
           title=f"{settings['sampler']} {settings['num_steps']} steps: fidelity against latency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)

    shown = [s for s, images in result["images"].items() if images is not None]
    tiles = np.concatenate([result["images"][s][:columns] for s in shown])
    image_grid((tiles * 255).round().astype(np.uint8), columns=min(columns, len(prompts))).save(out / "grid.png")
    (out / "grid.txt").write_text("rows, top to bottom: " + ", ".join(shown) + "\n")
    return report
