"""Searching reuse schedules: PHAST and exhaustive search (`phast`, pure), the paper's utility evaluated with shared
prefixes (`evaluator`), and searched schedules as files (`store`)."""

from .evaluator import Evaluator
from .phast import bit_flips, exhaustive, named_schedules, phast
from .store import cache_path, cached_phast, search_schedule

__all__ = ["Evaluator", "phast", "exhaustive", "bit_flips", "named_schedules", "search_schedule", "cached_phast",
           "cache_path"]
