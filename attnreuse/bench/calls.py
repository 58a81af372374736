"""Timing denoiser calls: plain, store and reuse calls of each mode side by side, and end-to-end sampling loops.

Every figure is a ratio to plain calls measured next to it in the same run: on shared machines a call's time
drifts by more than the differences measured (docs/BENCHMARKS.md, "How to read these figures").
"""

from __future__ import annotations

import statistics
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm

from ..pipelines.sampling import SD_SCHEDULER, denoise_step
from ..pipelines.timing import timed
from ..plan import Plan, Schedule, Unit
from ..reuse import apply_reuse

__all__ = ["VARIANTS", "options", "applied", "usable", "fp8_ok", "too_large", "count_operators", "per_call",
           "end_to_end"]

# name -> options of apply_attention_reuse; "blocks" is a plan: every transformer block reuses its residual
VARIANTS = {
    "map": dict(mode="map"),
    "map-torch": dict(mode="map", kernels=False),
    "map-fp16": dict(mode="map", cache_dtype="float16"),
    "map-bf16": dict(mode="map", cache_dtype="bfloat16"),
    "map-fp8": dict(mode="map", cache_dtype="float8_e4m3fn"),
    "qk": dict(mode="qk"),
    "output": dict(mode="output"),
    "auto": dict(mode="auto"),
    "blocks": dict(),
}


def options(variant: str) -> dict:
    """A variant's options of `apply_attention_reuse`, dtypes as torch dtypes."""
    chosen = dict(VARIANTS[variant])
    if isinstance(chosen.get("cache_dtype"), str):
        chosen["cache_dtype"] = getattr(torch, chosen["cache_dtype"])
    return chosen


def _ms(fn, device) -> float:
    return timed(fn, device)[1] * 1000


class _Operators(TorchDispatchMode):
    """Counts the aten operators a call runs in this thread, views (`_unsafe_view` too) left out: on a GPU about one
    kernel launch each, which is what a call costs where launches bound it rather than the GPU. The CPU store's
    blocks run in worker threads, which the count misses."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not (func.is_view or func.overloadpacket is torch.ops.aten._unsafe_view)
        return func(*args, **(kwargs or {}))


def count_operators(fn) -> int:
    """The non-view aten operators `fn()` runs."""
    with _Operators() as mode:
        fn()
    return mode.count


def fp8_ok(device) -> bool:
    return hasattr(torch, "float8_e4m3fn") and (device.type != "cuda"
                                                or torch.cuda.get_device_capability(device) >= (8, 9))


def usable(variants, device, skip) -> list[str]:
    """The variants this device can run (fp8 maps need an fp8-capable GPU, or the CPU) and that are not in `skip`."""
    return [v for v in variants if not (v.endswith("fp8") and not fp8_ok(device)) and v not in skip]


def _available_bytes() -> int | None:
    """Memory the system can still give (Linux's MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def too_large(variants, pairs: int, dtype, device, max_cache_bytes) -> dict[str, str]:
    """Map variants whose maps (`pairs` query-key pairs per call, all self-attention layers and the batch) would
    not fit in the CPU's free memory: the process would be killed, not raise as CUDA does. Under a budget the cache
    holds at most `max_cache_bytes`."""
    free = _available_bytes() if torch.device(device).type == "cpu" else None
    skip = {}
    for v in variants:
        chosen = options(v)
        if free is None or chosen.get("mode") != "map":
            continue
        need = pairs * (chosen.get("cache_dtype") or dtype).itemsize
        if min(need, max_cache_bytes if max_cache_bytes is not None else need) > 0.8 * free:
            skip[v] = f"maps need {gib(need)}, {gib(free)} free: set a budget (--max-cache) or 16-bit maps"
    return skip


@contextmanager
def applied(model, schedule, variant, **extra):
    """A variant applied to `model` with `schedule`'s bits (for "blocks", those of a blocks unit)."""
    if variant == "blocks":
        extra.pop("max_cache_bytes", None)  # a budget bounds attention slots only
        schedule = Plan({"blocks": Unit("blocks", Schedule(schedule).bits)})
    with apply_reuse(model, schedule, **options(variant), **extra) as handle:
        yield handle


# per call, on the bare model: plain (compute) calls at 0, 3 and 6 around a handle's first store (1), a reuse (2), a
# store over the memory the first one kept (4) and a second reuse (5)
_PER_CALL = "1101101"
_AROUND = {1: [0, 3], 2: [0, 3], 4: [3, 6], 5: [3, 6]}  # the plain calls either side of each measured call


def _per_call_rounds(model, call, variants, repeats, device, skip, budget) -> tuple[list, dict, dict, dict]:
    """The stock call and each variant's seven calls per round; round 0 counts operators (eager) or warms up."""
    plain, runs, cache, failed = [], {v: [] for v in variants}, {}, dict(skip)
    count = not hasattr(model, "_orig_mod")  # a compiled denoiser runs graphs that a dispatch mode would retrace
    for round_ in tqdm(range(repeats + 1), desc="per call (round 0 is warm-up)", dynamic_ncols=True):
        measure = count_operators if round_ == 0 and count else lambda fn: _ms(fn, device)
        plain.append(measure(call))
        for variant in [v for v in variants if v not in failed]:
            try:
                with applied(model, Schedule(_PER_CALL), variant, max_cache_bytes=budget) as handle:
                    runs[variant].append([measure(call) for _ in _PER_CALL])
                    cache[variant] = handle.stats()["peak_cache_bytes"] / 2**20
            except torch.OutOfMemoryError:
                failed[variant] = "out of memory"
                torch.cuda.empty_cache()
    return plain, runs, cache, failed


def _per_call_row(calls: list, counted: bool) -> dict:
    """Medians of a variant's rounds: each measured call over the mean of the plain calls around it."""
    ms = np.array(calls[1:])  # rounds x calls
    ratio = {i: ms[:, i] / ms[:, plain].mean(axis=1) for i, plain in _AROUND.items()}
    row = {"plain_ms": float(np.median(ms[:, [0, 3, 6]]))}
    for key, indices in (("first_store", [1]), ("store", [4]), ("reuse", [2, 5])):
        row[key + "_ms"] = float(np.median(ms[:, indices]))
        row[key + "_x"] = float(np.median(np.concatenate([ratio[i] for i in indices])))
    if counted:
        row["ops"] = dict(zip(("plain", "first_store", "reuse"), calls[0][:3]))
    return dict(row, runs_ms=ms.tolist())


def per_call(model, inputs, variants, repeats: int, device, skip=(), max_cache_bytes=None) -> dict:
    """Milliseconds of plain, store and reuse calls of each variant, and each as a ratio to the plain calls next to
    it (their median over rounds is the `*_x` figure). Each variant runs `_PER_CALL` per round behind a handle; a
    plain call of the stock processors (`sdpa`) opens each round. `first_store` is a handle's first store (new
    memory), `store` writes over kept memory (CPU maps), as every later store does. `runs_ms` keeps every call;
    the warm-up round of an eager denoiser counts operators instead (`ops`)."""
    inputs = {"timestep": torch.tensor(500.0, device=device), **inputs}  # a transformer's own timestep wins
    run = usable(variants, device, skip)
    with torch.no_grad():
        plain, runs, cache, failed = _per_call_rounds(model, lambda: model(**inputs), run, repeats, device, skip,
                                                      max_cache_bytes)
    counted = not hasattr(model, "_orig_mod")
    result = {"sdpa": {"ms": statistics.median(plain[1:]), "x": 1.0, "runs_ms": plain[1:]}}
    if counted:
        result["sdpa"]["ops"] = plain[0]
    for variant in variants:
        if variant not in run or variant in failed:
            result[variant] = {"skipped": failed.get(variant, "no fp8 on this device")}
        else:
            result[variant] = dict(_per_call_row(runs[variant], counted), cache_mib=cache[variant])
    return result


def _sampler(model, inputs, steps: int, device, guidance: float):
    """A DDIM loop with CFG over a UNet's inputs (the batch holds both branches), and its scheduler; for a
    transformer, a flow-matching Euler loop over its inputs (the batch as given) with no scheduler."""
    from diffusers import DDIMScheduler

    if "sample" not in inputs:
        return _flow_sampler(model, inputs, steps), None
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    latents0 = inputs["sample"][:inputs["sample"].shape[0] // 2]
    extra = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}

    def sample():
        scheduler.set_timesteps(steps, device=device)
        latents = latents0.clone()
        for t in scheduler.timesteps:
            latents = denoise_step(model, scheduler, latents, t, guidance, **extra)
        return latents

    return sample, scheduler


def _flow_sampler(model, inputs, steps: int):
    """`steps` Euler steps of the transformer's flow from its inputs' latents, the timestep falling from the inputs'
    to 0 (a learned variance's channels are left out)."""
    start, t0 = inputs["hidden_states"], inputs["timestep"]

    def sample():
        x = start.clone()
        for c in range(steps):
            out = model(**dict(inputs, hidden_states=x, timestep=t0 * (1 - c / steps)), return_dict=False)[0]
            x = x - out[:, :x.shape[1]] / steps
        return x

    return sample


def _kept(handle) -> tuple:
    """A handle's kept map memory and budget choices (the dicts survive `remove()`)."""
    budget = handle.cache.budget
    return handle.cache.memory.buffers, None if budget is None else budget.reserved


def _keep(handle, kept: tuple) -> None:
    handle.cache.memory.buffers = kept[0]
    if kept[1] is not None:
        handle.cache.budget.reserved = kept[1]


def _end_to_end_rounds(model, sample, scheduler, variants, schedule, repeats, device, budget):
    """Warm-up (and each variant's output), then timed rounds: no reuse, then each variant, per round."""
    runs, outputs, peaks, kept = {"none": []}, {}, {}, {}
    reference = sample()
    for variant in tqdm(list(variants), desc="end to end, warm-up", dynamic_ncols=True):
        try:
            with applied(model, Schedule(schedule), variant, scheduler=scheduler, max_cache_bytes=budget) as h:
                outputs[variant] = sample()
                kept[variant] = _kept(h)  # later generations write over them
            runs[variant] = []
        except torch.OutOfMemoryError:
            variants.remove(variant)
            torch.cuda.empty_cache()
    for _ in tqdm(range(repeats), desc="end to end, timed rounds", dynamic_ncols=True):
        runs["none"].append(_ms(sample, device))
        for variant in variants:
            with applied(model, Schedule(schedule), variant, scheduler=scheduler, max_cache_bytes=budget) as h:
                _keep(h, kept[variant])
                runs[variant].append(_ms(sample, device))
                peaks[variant] = h.stats()["peak_cache_bytes"]
    runs["none_again"] = [_ms(sample, device) for _ in range(max(1, repeats // 2))]
    return runs, reference, outputs, peaks


def end_to_end(model, inputs, variants, schedule: str, repeats: int, device, guidance: float = 7.5, skip=(),
               max_cache_bytes=None) -> dict:
    """Milliseconds per image batch of a DDIM loop with CFG, no reuse against each variant with `schedule`,
    interleaved (baseline, variants, baseline, ...) so drift hits all. `speedup` divides the baseline's median by
    the variant's; `speedup_local` is the median over rounds of each run against the mean of the baseline runs just
    before and after it. A timed run is a later generation of a handle: its kept map memory (CPU) comes from the
    variant's warm-up run, as when a user applies reuse once and generates many images."""
    sample, scheduler = _sampler(model, inputs, len(schedule), device, guidance)
    with torch.no_grad():
        runs, reference, outputs, peaks = _end_to_end_rounds(model, sample, scheduler, usable(variants, device, skip),
                                                             schedule, repeats, device, max_cache_bytes)
    base = statistics.median(runs["none"])
    around = np.convolve(runs["none"] + runs["none_again"][:1], [0.5, 0.5], "valid")  # baselines either side
    result = {}
    for name, times in runs.items():
        ms = statistics.median(times)
        row = {"ms": ms, "speedup": base / ms, "runs_ms": times}
        if name in outputs:
            diff = (outputs[name].float() - reference.float()).pow(2).mean().sqrt().item()
            row.update(speedup_local=float(np.median(around / np.array(times))), rms_latent_change=diff,
                       cache_mib=peaks[name] / 2**20)
        result[name] = row
    result.update({v: {"skipped": reason} for v, reason in dict(skip).items() if v in variants})
    return result
