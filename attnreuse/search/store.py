"""Searched schedules as files: `search_schedule` (what `attnreuse search` writes) and a cache of PHAST results
keyed by their setup (what `attnreuse eval`'s `phast:R` reads)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..schedule import Schedule
from ..utils import GenerationSetup
from .evaluator import Evaluator, model_name
from .phast import exhaustive, phast

__all__ = ["search_schedule", "schedule_cache_dir", "cached_phast"]


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


def schedule_cache_dir() -> Path:
    """Where searched schedules are kept: `$ATTNREUSE_CACHE/schedules`, by default ~/.cache/attnreuse/schedules."""
    return Path(os.environ.get("ATTNREUSE_CACHE") or Path.home() / ".cache" / "attnreuse") / "schedules"


def cached_phast(setup: GenerationSetup, reuse_steps: int, progress: bool = False) -> Path:
    """The schedule JSON of PHAST for this model, sampler, N, r, guidance and calibration set, searched on the first
    call and read back on later ones: a search costs minutes, an evaluation that names `phast:R` should not pay it
    every time. The file name says the setup; a hash of the sampler's config and the calibration prompts and seeds
    tells apart setups that the name does not."""
    pipe = setup.pipe
    model, sampler = model_name(pipe), type(pipe.scheduler).__name__
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    digest = hashlib.sha1(json.dumps([model, config, setup.num_steps, reuse_steps, setup.guidance, setup.prompts,
                                      setup.seeds], sort_keys=True, default=str).encode()).hexdigest()[:10]
    slug = re.sub(r"[^\w.-]+", "_", Path(model).name or model)
    path = schedule_cache_dir() / (f"{slug}-{sampler}-n{setup.num_steps}-r{reuse_steps}-g{setup.guidance:g}"
                                   f"-c{len(setup.prompts)}-{digest}.json")
    if not path.exists():
        search_schedule(setup, reuse_steps, progress=progress, cache_key=path.stem).to_json(path, indent=1)
    return path
