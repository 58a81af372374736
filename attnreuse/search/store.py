"""Searches as files: `search_schedule` (what `attnreuse search` writes), the plans shipped with the default model,
and a cache of searches keyed by their setup: PHAST schedules (what `attnreuse eval`'s `phast:R` reads) and plans
(what `plan:B` reads). A search in progress resumes from its own state file (`evaluator.read_state`)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from ..files import read_json
from ..pipelines.sampling import GenerationSetup
from ..plan import Schedule
from ..plan_cache import cache_root
from .evaluator import Evaluator, setup_key
from .latency import LatencyModel
from .phast import exhaustive, phast
from .planner import search_plan
from .quick import quick_plan

__all__ = ["search_schedule", "cache_path", "cached_phast", "cached_plan", "shipped_plan", "SHIPPED"]

SHIPPED = Path(__file__).resolve().parents[1] / "default_model" / "plans"  # searched for the default model


def search_schedule(setup: GenerationSetup | Evaluator, reuse_steps: int, epsilon: float = 0.0,
                    exhaustive_search: bool = False, state_file=None, progress: bool = False, **meta) -> Schedule:
    """PHAST (or, with `exhaustive_search`, every schedule) on a calibration set (a `GenerationSetup`, or an
    `Evaluator` of one): the best schedule with its timesteps and the metadata `attnreuse search` writes (HURRY's
    PSNR for comparison, the sweeps or the ranking, the search cost)."""
    evaluator = setup if isinstance(setup, Evaluator) else Evaluator(setup, state_file=state_file, progress=progress)
    n = evaluator.setup.num_steps
    meta = dict(meta, reuse_steps=reuse_steps, hurry_psnr_db=evaluator([Schedule.hurry(n, reuse_steps)])[0])
    if exhaustive_search:
        ranked = exhaustive(evaluator, n, reuse_steps)
        best = ranked[0][0]
        meta["ranking"] = [[str(s), round(u, 3)] for s, u in ranked]
    else:
        best, history = phast(evaluator, n, reuse_steps, epsilon=epsilon)
        meta.update(strategy="phast", epsilon=epsilon, history=history)
    return evaluator.describe(best, **meta)


def cache_path(kind: str, setup: GenerationSetup, label: str, **extra) -> Path:
    """Where a search on `setup` is kept: `$ATTNREUSE_CACHE/<kind>` (default ~/.cache/attnreuse/<kind>). The file
    name says the setup (`label` the search's own part); a hash of the setup, the sampler's config and `extra` tells
    apart setups that the name does not."""
    key, config = setup_key(setup), {k: v for k, v in setup.pipe.scheduler.config.items() if not k.startswith("_")}
    digest = hashlib.sha1(json.dumps([key, config, extra], sort_keys=True, default=str).encode()).hexdigest()[:10]
    slug = re.sub(r"[^\w.-]+", "_", Path(key["model"]).name or key["model"])
    folder = cache_root() / kind
    return folder / f"{slug}-{key['sampler']}-n{setup.num_steps}-{label}-c{len(setup.prompts)}-{digest}.json"


def _kept(path: Path, search, **json_options) -> Path:
    """`path`, written by `search()` (a schedule or plan) on the first call and read back on later ones: a search
    costs minutes, an evaluation that names it should not pay them every time."""
    if not path.exists():
        search().to_json(path, **json_options)
    return path


def cached_phast(setup: GenerationSetup, reuse_steps: int, progress: bool = False) -> Path:
    """The schedule JSON of PHAST for this model, sampler, N, r, guidance and calibration set, searched on the first
    call and read back on later ones."""
    path = cache_path("schedules", setup, f"r{reuse_steps}-g{setup.guidance:g}", reuse_steps=reuse_steps)
    return _kept(path, lambda: search_schedule(setup, reuse_steps, progress=progress, cache_key=path.stem), indent=1)


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


PLANNERS = {"quick": (quick_plan, {"effort": "quick"}), "full": (search_plan, {})}  # planner, its cache key's part


def cached_plan(setup: GenerationSetup, budget: float, progress: bool = False,
                latency: LatencyModel | None = None, effort: str = "quick") -> Path:
    """The plan for this setup and budget: a shipped one searched for it on this type of device, else one searched
    here (`effort`: "quick", the quick planner, or "full", the climb) on the first call and read back on later
    ones."""
    device_type = torch.device(setup.device).type
    shipped = _matching_shipped({**setup_key(setup), "budget": budget}, device_type)
    if shipped is not None:
        return shipped
    label = f"b{budget:g}" + ("" if effort == "full" else f"-{effort}")  # full searches keep their old files
    path = cache_path("plans", setup, label, budget=budget, device_type=device_type, **PLANNERS[effort][1])
    return _kept(path, lambda: PLANNERS[effort][0](setup, budget, progress=progress, latency=latency))
