"""Searched plans as files: the plans shipped with the default model, and a cache of searches keyed by their setup
(what `attnreuse eval`'s `plan:B` reads), as `search.cached_phast` keeps schedules."""

from __future__ import annotations

from pathlib import Path

import torch

from ..files import read_json
from ..pipelines.sampling import GenerationSetup
from ..search.evaluator import setup_key
from ..search.store import cache_path
from .latency import LatencyModel
from .search import search_plan

__all__ = ["SHIPPED", "shipped_plan", "cached_plan"]

SHIPPED = Path(__file__).resolve().parents[1] / "default_model" / "plans"  # searched for the default model


def shipped_plan(sampler: str, budget: float, num_steps: int = 20) -> Path:
    """The shipped plan of the default model for a sampler ("ddim" or "dpm++"), budget and step count."""
    path = SHIPPED / f"{sampler.replace('+', 'p')}{num_steps}-{budget:g}.json"
    if not path.exists():
        available = sorted(p.stem for p in SHIPPED.glob("*.json"))
        raise FileNotFoundError(f"no shipped plan {path.name}; the default model ships {available}.")
    return path


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
    device_type = torch.device(setup.device).type
    shipped = _matching_shipped({**setup_key(setup), "budget": budget}, device_type)
    if shipped is not None:
        return shipped
    path = cache_path("plans", setup, f"b{budget:g}", budget=budget, device_type=device_type)
    if not path.exists():
        search_plan(setup, budget, progress=progress, latency=latency).to_json(path)
    return path

