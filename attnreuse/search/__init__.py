"""Searching reuse schedules and plans.

`phast` (PHAST, the paper's Algorithm 1, and exhaustive search: pure functions of a utility), `evaluator` (the
paper's utility, evaluated with shared prefixes), and the planner, PHAST generalised from attention maps to every
unit: `levels` (what each reuse level reuses on a UNet or a transformer), `latency` (a profile of the device,
predicting a plan's latency), `space` (candidates, seeds and moves), `planner` (seeds, a dynamic program and a
budgeted hill-climb: `--effort full`), `quick` (the default planner: one recorded run, a table of what reuse costs
from the scheduler's own response, a dynamic program, a few verified candidates). `utility` is the PSNR they all
maximise. `store` keeps searches as files: searched schedules, cached PHAST schedules and plans, and
the plans shipped with the default model.
"""

from .evaluator import Evaluator, PlanningError
from .latency import LatencyModel, measure_latency, profile
from .levels import Levels
from .phast import bit_flips, exhaustive, named_schedules, phast
from .planner import search_plan
from .quick import quick_plan
from .space import Candidate
from .store import cache_path, cached_phast, cached_plan, search_schedule, shipped_plan

__all__ = ["Evaluator", "PlanningError", "phast", "exhaustive", "bit_flips", "named_schedules", "search_schedule",
           "cached_phast", "cache_path", "search_plan", "quick_plan", "cached_plan", "shipped_plan", "LatencyModel",
           "profile", "measure_latency", "Candidate", "Levels"]
