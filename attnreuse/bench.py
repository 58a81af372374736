"""`attnreuse bench`: what each reuse mode costs and buys on the SD1.5 and SDXL UNet architectures.

The UNets are built from the published configs kept in `attnreuse/configs` with random weights (speed does not
depend on the weights). Per call: milliseconds of a plain call (the stock `AttnProcessor2_0`, flash attention
where the device has it), a store call and a reuse call of each mode, each as a ratio to the plain calls just
before and after it. End to end: a 20-step DDIM loop with CFG over latents (no text encoder or VAE) with the
paper's PHAST schedule, against the same loop without reuse measured in the same run, and again at the end, so
drift shows. Times are medians over repeats after warm-up, CUDA-synchronised on GPU.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from contextlib import contextmanager
from importlib import resources

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm

from .hooks import apply_attention_reuse, attention_layers
from .schedule import Schedule

__all__ = ["build_unet", "bench", "PAPER_PHAST_DDIM20", "VARIANTS"]

# the paper's 20-step DDIM PHAST schedule for SD1.5, r = 10 (sec. 3.2)
PAPER_PHAST_DDIM20 = "11111111010001000000"

# name -> options of apply_attention_reuse (and the store implementation for map variants)
VARIANTS = {
    "map": dict(mode="map"),
    "map-torch": dict(mode="map", kernels=False),
    "map-fp16": dict(mode="map", cache_dtype="float16"),
    "map-bf16": dict(mode="map", cache_dtype="bfloat16"),
    "map-fp8": dict(mode="map", cache_dtype="float8_e4m3fn"),
    "qk": dict(mode="qk"),
    "output": dict(mode="output"),
    "auto": dict(mode="auto"),
}
RESOLUTION = {"sd15": 512, "sdxl": 1024}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def build_unet(arch: str, device, dtype, batch: int, size: int | None = None):
    """A random-weight UNet of `arch` ("sd15" or "sdxl") and the keyword inputs of one call at batch `batch`
    (images of `size` pixels, default the architecture's own)."""
    from diffusers import UNet2DConditionModel

    from .local import ARCHS

    if arch in ARCHS:  # the tests' tiny architectures
        spec = ARCHS[arch]
        factor = 2 ** (len(spec["vae"]) - 1)  # the VAE's downsampling, as in local.build_pipeline
        config = dict(spec["unet"], sample_size=spec["size"] // factor, in_channels=4, out_channels=4)
    elif arch in RESOLUTION:
        factor = 8
        config = json.loads(resources.files("attnreuse").joinpath(f"configs/{arch}_unet.json").read_text())
        config.pop("_comment", None)
    else:
        raise ValueError(f"Unknown architecture {arch!r}; choose from {sorted(RESOLUTION)} (or {sorted(ARCHS)}).")
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config).to(dtype).eval()
    size = size // factor if size else config["sample_size"]
    g = torch.Generator(device).manual_seed(0)
    inputs = dict(sample=torch.randn(batch, 4, size, size, generator=g, device=device, dtype=dtype),
                  encoder_hidden_states=torch.randn(batch, 77, config["cross_attention_dim"], generator=g,
                                                    device=device, dtype=dtype))
    if config.get("addition_embed_type") == "text_time":
        text = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(batch, text, generator=g, device=device, dtype=dtype),
            time_ids=torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch, device=device, dtype=dtype))
    return unet, inputs


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000


class _Operators(TorchDispatchMode):
    """Counts the aten operators a call runs in this thread, views (`_unsafe_view` too) left out: on a GPU about one
    kernel launch each, which is what a call costs where launches bound it rather than the GPU (SD1.5 at batch 2 on
    an H100 or H200, docs/BENCHMARKS.md). The CPU store's blocks run in worker threads, which the count misses."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not (func.is_view or func.overloadpacket is torch.ops.aten._unsafe_view)
        return func(*args, **(kwargs or {}))


def _operators(fn) -> int:
    with _Operators() as mode:
        fn()
    return mode.count


def _options(variant: str) -> tuple[dict, str]:
    options = dict(VARIANTS[variant])
    kernels = options.pop("kernels", True)
    if isinstance(options.get("cache_dtype"), str):
        options["cache_dtype"] = getattr(torch, options["cache_dtype"])
    return options, kernels


@contextmanager
def _apply(unet, schedule, variant, **extra):
    """`apply_attention_reuse` with a variant's options; the kernel switch is put back on exit."""
    from . import processors

    options, kernels = _options(variant)
    before, processors.USE_KERNELS = processors.USE_KERNELS, kernels
    try:
        with apply_attention_reuse(unet, schedule, **options, **extra) as handle:
            yield handle
    finally:
        processors.USE_KERNELS = before


def _usable(variants, device, skip) -> list[str]:
    """The variants this device can run (fp8 maps need an fp8-capable GPU, or the CPU) and that are not in `skip`."""
    return [v for v in variants if not (v.endswith("fp8") and not _fp8_ok(device)) and v not in skip]


def _available_bytes() -> int | None:
    """Memory the system can still give (Linux's MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def _too_large(variants, pairs: int, dtype, device, max_cache_bytes) -> dict[str, str]:
    """Map variants whose maps (`pairs` query-key pairs per call, all self-attention layers and the batch) would
    not fit in the CPU's free memory: the process would be killed, not raise as CUDA does. Under a budget the cache
    holds at most `max_cache_bytes`."""
    free = _available_bytes() if torch.device(device).type == "cpu" else None
    skip = {}
    for v in variants:
        options, _ = _options(v)
        if free is None or options.get("mode") != "map":
            continue
        need = pairs * (options.get("cache_dtype") or dtype).itemsize
        if min(need, max_cache_bytes if max_cache_bytes is not None else need) > 0.8 * free:
            skip[v] = f"maps need {_gib(need)}, {_gib(free)} free: set a budget (--max-cache) or 16-bit maps"
    return skip


# per call, on the bare model: plain (compute) calls at 0, 3 and 6 around a handle's first store (1), a reuse (2), a
# store over the memory the first one kept (4) and a second reuse (5)
_PER_CALL = "1101101"
_AROUND = {1: [0, 3], 2: [0, 3], 4: [3, 6], 5: [3, 6]}  # the plain calls either side of each measured call


def per_call(unet, inputs, variants, repeats: int, device, skip=(), **options) -> dict:
    """Milliseconds of plain, store and reuse calls, and each as a ratio to the plain calls next to it. Each
    variant runs `_PER_CALL` per round: its plain calls (the layers' own processors, behind the handle's hooks)
    bracket a first store, a reuse, a later store and a reuse, and each of those is divided by the mean of the two
    plain calls around it. On the shared development machines a call's time drifts by more than the differences
    measured (docs/BENCHMARKS.md), so only these local ratios are compared; their medians over rounds are the
    `*_x` figures. A plain call of the stock processors (no handle) opens each round (`sdpa`); round 0 is a
    warm-up. `first_store` is a handle's first store (new memory); `store` writes over kept memory (CPU maps), as
    every later store does. `runs_ms` keeps every timed call (per round: the stock call; each variant's seven).
    The warm-up round of an eager UNet counts each call's operators instead of timing it (`_Operators`): `ops` of
    the stock call and of each variant's plain, first store and reuse calls.
    `options` go to `apply_attention_reuse` (a budget); variants in `skip` do not run."""
    t = torch.tensor(500.0, device=device)
    call = lambda: unet(timestep=t, **inputs)  # noqa: E731
    usable = _usable(variants, device, skip)
    plain, runs, cache, failed = [], {v: [] for v in usable}, {}, dict(skip)
    count = not hasattr(unet, "_orig_mod")  # a compiled UNet runs graphs that a dispatch mode would retrace
    with torch.no_grad():
        for round_ in tqdm(range(repeats + 1), desc="per call (round 0 is warm-up)", dynamic_ncols=True):
            measure = _operators if round_ == 0 and count else lambda fn: _timed(fn, device)
            plain.append(measure(call))
            for variant in usable:
                if variant in failed:
                    continue
                try:
                    with _apply(unet, Schedule(_PER_CALL), variant, **options) as handle:
                        runs[variant].append([measure(call) for _ in _PER_CALL])
                        cache[variant] = handle.stats()["peak_cache_bytes"] / 2**20
                except torch.OutOfMemoryError:
                    failed[variant] = "out of memory"
                    torch.cuda.empty_cache()
    result = {"sdpa": {"ms": statistics.median(plain[1:]), "x": 1.0, "runs_ms": plain[1:]}}
    if count:
        result["sdpa"]["ops"] = plain[0]
    for variant in variants:
        if variant not in usable or variant in failed:
            result[variant] = {"skipped": failed.get(variant, "no fp8 on this device")}
            continue
        ms = np.array(runs[variant][1:])  # rounds x calls
        ratio = {i: ms[:, i] / ms[:, plain].mean(axis=1) for i, plain in _AROUND.items()}
        row = {"plain_ms": float(np.median(ms[:, [0, 3, 6]]))}
        for key, calls in (("first_store", [1]), ("store", [4]), ("reuse", [2, 5])):
            row[key + "_ms"] = float(np.median(ms[:, calls]))
            row[key + "_x"] = float(np.median(np.concatenate([ratio[i] for i in calls])))
        if count:
            row["ops"] = dict(zip(("plain", "first_store", "reuse"), runs[variant][0][:3]))
        result[variant] = dict(row, cache_mib=cache[variant], runs_ms=ms.tolist())  # per round, as `_PER_CALL`
    return result


def _fp8_ok(device) -> bool:
    return hasattr(torch, "float8_e4m3fn") and (device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9))


def end_to_end(unet, inputs, variants, schedule: str, repeats: int, device, guidance: float = 7.5, skip=(),
               **options) -> dict:
    """Seconds per image-batch of a DDIM loop with CFG (the UNet batch holds both branches), no reuse against
    each variant with `schedule`; runs are interleaved (baseline, variants, baseline, ...) so drift hits all.
    `speedup` divides the baseline's median by the variant's; `speedup_local` is the median over rounds of each run
    against the mean of the baseline runs just before and after it, which drift over the run does not bias.
    A timed run is a later generation of a handle, as when a user applies reuse once and generates many images:
    the handle's kept map memory (`ReuseState.buffer`, CPU) is carried over from the variant's warm-up run. The
    one-off cost of a handle's first stores is the per-call `first_store_ms`. `options` and `skip` as in
    `per_call`."""
    from diffusers import DDIMScheduler

    from .local import _SD_SCHEDULER

    scheduler = DDIMScheduler(**_SD_SCHEDULER)
    steps = len(schedule)
    half = inputs["sample"].shape[0] // 2
    latents0 = inputs["sample"][:half]
    extra = {k: v for k, v in inputs.items() if k != "sample"}

    def sample():
        scheduler.set_timesteps(steps, device=device)
        latents = latents0.clone()
        for t in scheduler.timesteps:
            eps = unet(torch.cat([latents] * 2), t, **extra).sample
            uncond, cond = eps.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        return latents

    runs = {"none": []}
    outputs, peaks, kept = {}, {}, {}
    usable = _usable(variants, device, skip)
    with torch.no_grad():
        reference = sample()  # warm-up too
        for variant in tqdm(list(usable), desc="end to end, warm-up", dynamic_ncols=True):
            try:
                with _apply(unet, Schedule(schedule), variant, scheduler=scheduler, **options) as handle:
                    outputs[variant] = sample()  # warm-up, and the output for the error column
                    kept[variant] = handle.state.buffers, handle.state.reserved  # the dicts survive remove()
                runs[variant] = []
            except torch.OutOfMemoryError:
                usable.remove(variant)
                torch.cuda.empty_cache()
        for _ in tqdm(range(repeats), desc="end to end, timed rounds", dynamic_ncols=True):
            runs["none"].append(_timed(sample, device))
            for variant in usable:
                with _apply(unet, Schedule(schedule), variant, scheduler=scheduler, **options) as handle:
                    handle.state.buffers, handle.state.reserved = kept[variant]
                    runs[variant].append(_timed(sample, device))
                    peaks[variant] = handle.stats()["peak_cache_bytes"]
        kept.clear()
        runs["none_again"] = [_timed(sample, device) for _ in range(max(1, repeats // 2))]
    base = statistics.median(runs["none"])
    around = np.convolve(runs["none"] + runs["none_again"][:1], [0.5, 0.5], "valid")  # baselines either side
    result = {}
    for name, times in runs.items():
        ms = statistics.median(times)
        row = {"ms": ms, "speedup": base / ms, "runs_ms": times}
        if name in outputs:  # also each run against the mean of the no-reuse runs just before and after it
            row["speedup_local"] = float(np.median(around / np.array(times)))
            diff = (outputs[name].float() - reference.float()).pow(2).mean().sqrt().item()
            row.update(rms_latent_change=diff, cache_mib=peaks[name] / 2**20)
        result[name] = row
    result.update({v: {"skipped": reason} for v, reason in dict(skip).items() if v in variants})
    return result


def attention_only(batch: int, heads: int, tokens: int, dim: int, device, dtype, repeats: int = 20) -> dict:
    """One self-attention layer's core, projections left out: flash (SDPA) against a store (explicit softmax
    then A V; the fused kernel where it runs) and a reuse (A V from a kept map: the model's dtype, fp8, and bf16
    on a CPU)."""
    from .processors import _FP8_SCALE, _kernel_ok, _times_map, check_kernels

    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(batch, tokens, heads, dim, generator=g, device=device, dtype=dtype).transpose(1, 2)
               for _ in range(3))
    scale = dim ** -0.5
    flat = lambda x: x.reshape(-1, tokens, dim)  # noqa: E731
    attn_map = torch.softmax(flat(q) @ flat(k).transpose(1, 2) * scale, -1)
    cases = {
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale),
        "store torch": lambda: torch.bmm(torch.softmax(torch.baddbmm(
            torch.empty(1, 1, 1, device=device, dtype=dtype), flat(q), flat(k).transpose(1, 2), beta=0,
            alpha=scale), -1), flat(v)),
        "reuse torch": lambda: torch.bmm(attn_map, flat(v)),
    }
    if torch.device(device).type == "cpu" and dtype == torch.float32:  # blockwise stores (new, kept memory), bf16
        from .processors import _map_store_cpu

        cases["store blockwise new"] = lambda: _map_store_cpu(q, k, v, scale, torch.empty_like(attn_map))
        kept = torch.empty_like(attn_map)
        cases["store blockwise kept"] = lambda: _map_store_cpu(q, k, v, scale, kept)
        kept16 = torch.empty_like(attn_map, dtype=torch.bfloat16)
        cases["store blockwise bf16 kept"] = lambda: _map_store_cpu(q, k, v, scale, kept16)
        bf16 = attn_map.to(torch.bfloat16)  # the CPU's 16-bit map: its matmul has AMX units on recent Xeons
        cases["reuse bf16"] = lambda: _times_map(bf16, flat(v), None)
    fp8_dtype = getattr(torch, "float8_e4m3fn", None)
    fp8 = (attn_map * _FP8_SCALE[fp8_dtype]).to(fp8_dtype) if _fp8_ok(device) else None
    if fp8 is not None:
        cases["reuse fp8 torch"] = lambda: _times_map(fp8, flat(v), 1 / _FP8_SCALE[fp8_dtype])
    device = torch.device(device)
    for map_dtype in (dtype, fp8_dtype if fp8 is not None else None):
        if map_dtype is None:
            continue
        check_kernels(device, dtype, [dim], map_dtype)
        tag = "fp8 " if map_dtype == fp8_dtype else ""
        packed = fp8 if tag else attn_map
        if _kernel_ok("store", q, dim, map_dtype):
            cases[f"store {tag}kernel"] = lambda f=bool(tag): torch.ops.attnreuse.attention_with_map(q, k, v, scale, f)
        if _kernel_ok("reuse", v, dim, map_dtype):
            cases[f"reuse {tag}kernel"] = lambda m=packed: torch.ops.attnreuse.apply_map(m, v, 1.0)
    result = {}
    with torch.no_grad():
        for name, fn in cases.items():
            fn()
            result[name] = statistics.median(_timed(fn, device) for _ in range(repeats))
    base = result["sdpa"]
    return {"shape": [batch, heads, tokens, dim], "map_mib": attn_map.numel() * attn_map.element_size() / 2**20,
            **{name: {"ms": ms, "x": ms / base} for name, ms in result.items()}}


def _attention_profile(unet, inputs, device, calls: int = 3) -> tuple[tuple[int, int, int], dict, int]:
    """From plain calls with hooks on every attention module: (heads, tokens, head dim) of the self-attention layer
    with the most tokens, the median share of a call spent in self- and cross-attention modules, and the number
    of entries of all self-attention maps of one call (batch included). A reuse call
    still runs everything else, so that share bounds what any mode can save."""
    kinds = attention_layers(unet)
    shapes, clock, spent = [], {}, {"self": 0.0, "cross": 0.0}

    def before(name):
        def hook(mod, args, kwargs):
            if kinds[name] == "self":
                tokens = (args[0] if args else kwargs["hidden_states"]).shape[1]
                shapes.append((mod.heads, tokens, mod.inner_dim // mod.heads))
            _sync(device)
            clock[name] = time.perf_counter()
        return hook

    def after(name):
        def hook(mod, args, kwargs, output):
            _sync(device)
            spent[kinds[name]] += time.perf_counter() - clock[name]
        return hook

    modules = {name: unet.get_submodule(name) for name in kinds}
    hooks = [h for name, m in modules.items() for h in (m.register_forward_pre_hook(before(name), with_kwargs=True),
                                                       m.register_forward_hook(after(name), with_kwargs=True))]
    t = torch.tensor(500.0, device=inputs["sample"].device)
    shares = {"self": [], "cross": []}
    try:
        with torch.no_grad():
            for _ in range(calls):
                spent.update(self=0.0, cross=0.0)
                total = _timed(lambda: unet(timestep=t, **inputs), device) / 1000
                for kind, seconds in spent.items():
                    shares[kind].append(seconds / total)
    finally:
        for h in hooks:
            h.remove()
    pairs = inputs["sample"].shape[0] * sum(h * t * t for h, t, _ in shapes) // calls
    return max(shapes, key=lambda s: s[1]), {kind: statistics.median(v) for kind, v in shares.items()}, pairs


def bench(arch: str = "sd15", batch: int = 2, device: str = "cpu", dtype: str | None = None,
          variants=("map", "qk", "output", "auto"), repeats: int = 5, e2e_repeats: int = 3,
          schedule: str = PAPER_PHAST_DDIM20, compile: bool = False, e2e_variants=None,
          size: int | None = None, max_cache_bytes: int | None = None) -> dict:
    """Per-call and end-to-end figures for one architecture, batch and device (see the module docstring), with the
    cache under `max_cache_bytes` if given. On a CPU, map variants whose maps would not fit in free memory are
    skipped (named in the results) instead of the process being killed."""
    unknown = [v for v in (*variants, *(e2e_variants or ())) if v not in VARIANTS]
    if unknown:
        raise ValueError(f"Unknown bench mode(s) {unknown}; choose from {sorted(VARIANTS)}.")
    if max_cache_bytes is not None and max_cache_bytes < 0:
        raise ValueError(f"The cache budget must not be negative, got {max_cache_bytes} bytes.")
    device = torch.device(device)
    dtype = getattr(torch, dtype) if dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    unet, inputs = build_unet(arch, device, dtype, batch, size)
    if compile:
        unet = torch.compile(unet)
    from .local import ARCHS

    info = dict(arch=arch, resolution=size or RESOLUTION.get(arch) or ARCHS[arch]["size"], batch=batch, device=device_name(device),
                dtype=str(dtype).removeprefix("torch."), torch=torch.__version__, compiled=compile,
                schedule=schedule, max_cache_bytes=max_cache_bytes)
    (heads, tokens, dim), share, pairs = _attention_profile(getattr(unet, "_orig_mod", unet), inputs, device)
    e2e_variants = variants if e2e_variants is None else e2e_variants
    skip = _too_large({*variants, *e2e_variants}, pairs, dtype, device, max_cache_bytes)
    info["map_gib"] = pairs * dtype.itemsize / 2**30  # every self-attention map of a call, in the model's dtype
    options = dict(skip=skip, max_cache_bytes=max_cache_bytes)
    out = {"setup": info, "attention_share": share,
           "attention_only": attention_only(inputs["sample"].shape[0], heads, tokens, dim, device, dtype, 4 * repeats),
           "per_call": per_call(unet, inputs, variants, repeats, device, **options)}
    if e2e_variants:
        out["end_to_end"] = end_to_end(unet, inputs, e2e_variants, schedule, e2e_repeats, device, **options)
    return out


def quality(pipe, schedule: str, count: int = 16, variants=("map", "map-fp16", "map-fp8", "qk", "output", "auto"),
            guidance: float = 7.5) -> dict:
    """Mean PSNR (dB, capped at search.PSNR_CAP) of each mode's images against the no-reuse images of the same
    held-out captions and seeds (half one-shape, half two-shape), and against the map mode's own images:
    what a mode or map precision costs in fidelity, on a trained model."""
    from .evaluation import generate, held_out_captions
    from .metrics import psnr
    from .search import PSNR_CAP

    prompts = held_out_captions(count // 2, False) + held_out_captions(count - count // 2, True)
    seeds = list(range(count))
    kwargs = dict(num_inference_steps=len(schedule), guidance_scale=guidance, batch_size=count)
    full = generate(pipe, prompts, seeds, **kwargs)
    images, peaks = {}, {}
    for variant in variants:
        with _apply(pipe, Schedule(schedule), variant) as handle:
            images[variant] = generate(pipe, prompts, seeds, **kwargs)
            peaks[variant] = handle.stats()["peak_cache_bytes"]

    def mean_psnr(a, b):
        return float(np.mean([min(PSNR_CAP, psnr(x / 255, y / 255)) for x, y in zip(a, b)]))

    return {"schedule": schedule, "count": count, "guidance": kwargs["guidance_scale"], "modes": {
        v: {"psnr_vs_full_db": mean_psnr(images[v], full), "psnr_vs_map_db": mean_psnr(images[v], images["map"])
            if "map" in images else None, "cache_mib": peaks[v] / 2**20} for v in variants}}


def markdown(results: list[dict]) -> str:
    """Tables of `bench` results: per call (ratios to the plain calls around each) and end to end (speed-ups)."""
    lines = []
    for r in results:
        s = r["setup"]
        budget = s.get("max_cache_bytes")
        lines += [f"### {s['arch']} {s['resolution']}x{s['resolution']}, batch {s['batch']}, {s['dtype']}"
                  f"{', torch.compile' if s['compiled'] else ''}"
                  f"{f', cache budget {_gib(budget)}' if budget is not None else ''} on {s['device']}", ""]
        if "attention_share" in r:
            lines += [f"Attention modules take {r['attention_share']['self']:.1%} (self) and "
                      f"{r['attention_share']['cross']:.1%} (cross) of a plain call: all that a reuse call can skip.",
                      ""]
        ao = r["attention_only"]
        b_, h_, t_, d_ = ao["shape"]
        lines += [f"Attention only, the largest self-attention layer (batch {b_}, {h_} heads, {t_} tokens, head dim "
                  f"{d_}; map {ao['map_mib']:.0f} MiB): " + ", ".join(
                      f"{name} {row['ms']:.3f} ms ({row['x']:.2f}x)" for name, row in ao.items()
                      if isinstance(row, dict)), "",
                  "Per call; each ratio is the median over rounds of the call's time over the mean of the plain calls "
                  "just before and after it in the same sequence. Operators: aten operators other than views in one "
                  "call (about one kernel launch each on a GPU), counted in the warm-up round:", "",
                  "| mode | plain call | first store call | store call | reuse call | cache | operators: plain / store "
                  "/ reuse |", "|---|---|---|---|---|---|---|"]
        pc = r["per_call"]
        lines.append(f"| stock processors (sdpa) | {pc['sdpa']['ms']:.2f} ms | | | | | {pc['sdpa'].get('ops', '')} |")
        for name, row in pc.items():
            if "skipped" in row:
                lines.append(f"| {name} | {row['skipped']} | | | | | |")
            elif "store_ms" in row:
                ops = " / ".join(str(n) for n in row["ops"].values()) if "ops" in row else ""
                lines.append(f"| {name} | {row['plain_ms']:.2f} ms | " + " | ".join(
                    f"{row[k + '_ms']:.2f} ms ({row[k + '_x']:.2f}x)" for k in ("first_store", "store", "reuse"))
                    + f" | {row['cache_mib']:.0f} MiB | {ops} |")
        if "end_to_end" in r:
            lines += ["", f"End to end, {len(s['schedule'])}-step DDIM with CFG, schedule `{s['schedule']}`:", "",
                      "| mode | time | speed-up (medians) | speed-up (each run against the baselines around it) "
                      "| RMS change of the final latents | cache |", "|---|---|---|---|---|---|"]
            for name, row in r["end_to_end"].items():
                if "skipped" in row:
                    lines.append(f"| {name} | {row['skipped']} | | | | |")
                    continue
                extra = (f"{row['speedup_local']:.3f}x | {row['rms_latent_change']:.4f} | {row['cache_mib']:.0f} MiB"
                         if "cache_mib" in row else " | | ")
                lines.append(f"| {name} | {row['ms']:.0f} ms | {row['speedup']:.3f}x | {extra} |")
        lines.append("")
    return "\n".join(lines)
