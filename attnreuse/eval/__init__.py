"""Evaluation: every method on the same prompts and seeds against the full sampler, at measured latency.

`methods` (a registry: full, step reduction, reuse schedules, the peers), `runner` (timed rounds, figures per
method, matched-latency pairs), `metrics` (SSIM and the opt-in CLIP score, LPIPS, FID), `report` and `plots`.
"""

from .methods import PeerUnavailable, family, method
from .runner import PRESETS, compare_methods, matched_latency, merge_runs, run_methods, summarize

__all__ = ["method", "family", "PeerUnavailable", "PRESETS", "compare_methods", "run_methods", "summarize",
           "merge_runs", "matched_latency"]
