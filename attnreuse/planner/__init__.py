"""The reuse planner: plans over every unit, searched for a measured latency budget.

`levels` (what each reuse level reuses on a UNet or a transformer), `latency` (a profile of the device, predicting
a plan's latency), `space` (candidates, seeds and moves), `search`
(seeds, a dynamic program and a budgeted hill-climb on the prefix-shared evaluator).
"""

from .latency import LatencyModel, measure_latency, profile
from .levels import Levels
from .search import search_plan
from .space import Candidate
from .store import cached_plan, shipped_plan

__all__ = ["search_plan", "cached_plan", "shipped_plan", "LatencyModel", "profile", "measure_latency", "Candidate",
           "Levels"]
