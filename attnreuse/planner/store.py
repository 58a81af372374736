"""Searched plans as files: the plans shipped with the default model, and a cache of searches keyed by their setup
(what `attnreuse eval`'s `plan:B` reads), as `search.cached_phast` keeps schedules."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from ..search.evaluator import model_name
from ..utils import GenerationSetup, read_json
from .latency import LatencyModel
from .search import search_plan

__all__ = ["SHIPPED", "shipped_plan", "plan_cache_dir", "cached_plan", "setup_fields"]

SHIPPED = Path(__file__).resolve().parents[1] / "default_model" / "plans"  # searched for the default model


def setup_fields(setup: GenerationSetup, budget: float) -> dict:
    """What a searched plan depends on, as its `meta` records it."""
    return {"model": model_name(setup.pipe), "sampler": type(setup.pipe.scheduler).__name__,
            "num_inference_steps": setup.num_steps, "guidance_scale": setup.guidance, "prompts": setup.prompts,
            "seeds": setup.seeds, "budget": budget}


def shipped_plan(sampler: str, budget: float, num_steps: int = 20) -> Path:
    """The shipped plan of the default model for a sampler ("ddim" or "dpm++"), budget and step count."""
    path = SHIPPED / f"{sampler.replace('+', 'p')}{num_steps}-{budget:g}.json"
    if not path.exists():
        available = sorted(p.stem for p in SHIPPED.glob("*.json"))
        raise FileNotFoundError(f"no shipped plan {path.name}; the default model ships {available}.")
    return path


def plan_cache_dir() -> Path:
    """Where searched plans are kept: `$ATTNREUSE_CACHE/plans`, by default ~/.cache/attnreuse/plans."""
    return Path(os.environ.get("ATTNREUSE_CACHE") or Path.home() / ".cache" / "attnreuse") / "plans"


def _matching_shipped(fields: dict, device_type: str) -> Path | None:
    """A shipped plan searched for exactly this setup on a device of this type."""
    for path in sorted(SHIPPED.glob("*.json")):
        meta = read_json(path, "shipped plan").get("meta", {})
        if all(meta.get(k) == v for k, v in fields.items()) and meta.get("device_type") == device_type:
            return path
    return None


def cached_plan(setup: GenerationSetup, budget: float, progress: bool = False,
                latency: LatencyModel | None = None) -> Path:
    """The plan for this setup and budget: a shipped one searched for it on this type of device, else one searched
    here on the first call and read back on later ones (a search takes minutes)."""
    fields = setup_fields(setup, budget)
    device_type = torch.device(setup.device).type
    shipped = _matching_shipped(fields, device_type)
    if shipped is not None:
        return shipped
    config = {k: v for k, v in setup.pipe.scheduler.config.items() if not k.startswith("_")}
    digest = hashlib.sha1(json.dumps([fields, config, device_type], sort_keys=True, default=str).encode())
    slug = re.sub(r"[^\w.-]+", "_", Path(fields["model"]).name or fields["model"])
    path = plan_cache_dir() / (f"{slug}-{fields['sampler']}-n{setup.num_steps}-b{budget:g}-c{len(setup.prompts)}-"
                               f"{digest.hexdigest()[:10]}.json")
    if not path.exists():
        search_plan(setup, budget, progress=progress, latency=latency).to_json(path)
    return path

