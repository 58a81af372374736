"""`attnreuse bench`: what each reuse mode costs and buys, per call and end to end, and what it costs in fidelity."""

from __future__ import annotations

import torch

from ..pipelines.sampling import GenerationSetup
from ..pipelines.timing import device_name
from ..pipelines.tiny import ARCHS, MODEL_ONLY
from ..search.utility import mean_psnr
from .attention import attention_only, attention_profile
from .calls import VARIANTS, applied, end_to_end, per_call, too_large
from .models import TRANSFORMERS, build_transformer, build_unet, resolution

__all__ = ["PAPER_PHAST_DDIM20", "bench", "quality"]

# the paper's 20-step DDIM PHAST schedule for SD1.5, r = 10 (sec. 3.2)
PAPER_PHAST_DDIM20 = "11111111010001000000"


def _check(variants, e2e_variants, max_cache_bytes) -> None:
    unknown = [v for v in (*variants, *(e2e_variants or ())) if v not in VARIANTS]
    if unknown:
        raise ValueError(f"Unknown bench mode(s) {unknown}; choose from {sorted(VARIANTS)}.")
    if max_cache_bytes is not None and max_cache_bytes < 0:
        raise ValueError(f"The cache budget must not be negative, got {max_cache_bytes} bytes.")


def _model(arch, device, dtype, batch, size, layers, text_tokens):
    """The denoiser of `arch` (a UNet, or a transformer of `layers` blocks and `text_tokens` text tokens) and the
    inputs of one call."""
    if arch in TRANSFORMERS or (ARCHS.get(arch) or MODEL_ONLY.get(arch, {})).get("family", "unet") != "unet":
        return build_transformer(arch, device, dtype, batch, size, layers, text_tokens)
    return build_unet(arch, device, dtype, batch, size)


def bench(arch: str = "sd15", batch: int = 2, device: str = "cpu", dtype: str | None = None,
          variants=("map", "qk", "output", "auto"), repeats: int = 5, e2e_repeats: int = 3,
          schedule: str = PAPER_PHAST_DDIM20, compile: bool = False, e2e_variants=None,
          size: int | None = None, max_cache_bytes: int | None = None, layers: int | None = None,
          text_tokens: int | None = None) -> dict:
    """Per-call and end-to-end figures for one architecture, batch and device, with the cache under
    `max_cache_bytes` if given: the share of a call attention takes, the largest layer's attention alone, each
    variant's plain, store and reuse calls, and a sampling loop with `schedule`. On a CPU, map variants whose maps
    would not fit in free memory are skipped (named in the results) instead of the process being killed.
    Transformers (pixart-sigma, sd3-medium, flux-dev) may keep only `layers` blocks and `text_tokens` tokens."""
    _check(variants, e2e_variants, max_cache_bytes)
    device = torch.device(device)
    dtype = getattr(torch, dtype) if dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    model, inputs = _model(arch, device, dtype, batch, size, layers, text_tokens)
    if compile:
        model = torch.compile(model)
    info = dict(arch=arch, resolution=size or resolution(arch), batch=batch, device=device_name(device),
                dtype=str(dtype).removeprefix("torch."), torch=torch.__version__, compiled=compile,
                schedule=schedule, max_cache_bytes=max_cache_bytes, layers=layers, text_tokens=text_tokens,
                loop="ddim-cfg" if "sample" in inputs else "flow-euler")
    (heads, tokens, dim), share, pairs = attention_profile(getattr(model, "_orig_mod", model), inputs, device)
    e2e_variants = variants if e2e_variants is None else e2e_variants
    skip = too_large({*variants, *e2e_variants}, pairs, dtype, device, max_cache_bytes)
    info["map_gib"] = pairs * dtype.itemsize / 2**30  # every self-attention map of a call, in the model's dtype
    out = {"setup": info, "attention_share": share,
           "attention_only": attention_only(_batch(inputs), heads, tokens, dim, device, dtype, 4 * repeats),
           "per_call": per_call(model, inputs, variants, repeats, device, skip, max_cache_bytes)}
    if e2e_variants:
        out["end_to_end"] = end_to_end(model, inputs, e2e_variants, schedule, e2e_repeats, device, skip=skip,
                                       max_cache_bytes=max_cache_bytes)
    return out


def _batch(inputs) -> int:
    return inputs.get("sample", inputs.get("hidden_states")).shape[0]


def quality(pipe, schedule: str, prompts: list[str], variants=("map", "map-fp16", "map-fp8", "qk", "output", "auto"),
            guidance: float = 7.5) -> dict:
    """Mean PSNR (dB) of each mode's images against the no-reuse images of the same prompts and seeds, and against
    the map mode's own images: what a mode or map precision costs in fidelity, on a trained model."""
    setup = GenerationSetup(pipe, prompts, None, len(schedule), guidance)
    full = setup.generate()
    images, peaks = {}, {}
    for variant in variants:
        with applied(pipe, schedule, variant) as handle:
            images[variant] = setup.generate()
            peaks[variant] = handle.stats()["peak_cache_bytes"]
    return {"schedule": schedule, "count": len(prompts), "guidance": guidance, "modes": {
        v: {"psnr_vs_full_db": mean_psnr(images[v], full),
            "psnr_vs_map_db": mean_psnr(images[v], images["map"]) if "map" in images else None,
            "cache_mib": peaks[v] / 2**20} for v in variants}}
