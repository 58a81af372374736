"""Searched schedules as files: `search_schedule` (what `attnreuse search` writes) and a cache of PHAST results
keyed by their setup (what `attnreuse eval`'s `phast:R` reads)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..pipelines.sampling import GenerationSetup
from ..schedule import Schedule
from .evaluator import Evaluator, setup_key
from .phast import exhaustive, phast

__all__ = ["search_schedule", "cache_path", "cached_phast"]


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
    folder = Path(os.environ.get("ATTNREUSE_CACHE") or Path.home() / ".cache" / "attnreuse") / kind
    return folder / f"{slug}-{key['sampler']}-n{setup.num_steps}-{label}-c{len(setup.prompts)}-{digest}.json"


def cached_phast(setup: GenerationSetup, reuse_steps: int, progress: bool = False) -> Path:
    """The schedule JSON of PHAST for this model, sampler, N, r, guidance and calibration set, searched on the first
    call and read back on later ones: a search costs minutes, an evaluation that names `phast:R` should not pay it
    every time."""
    path = cache_path("schedules", setup, f"r{reuse_steps}-g{setup.guidance:g}", reuse_steps=reuse_steps)
    if not path.exists():
        search_schedule(setup, reuse_steps, progress=progress, cache_key=path.stem).to_json(path, indent=1)
    return path
