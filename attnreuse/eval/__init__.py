"""Evaluation: every method on the same prompts and seeds against the full sampler, at measured latency.

`methods` (the registry: one `MethodSpec` per method, full, step reduction, reuse schedules and plans, the peers; the
presets, families and plot styles are read from it), `runner` (timed rounds, figures per method, matched-latency
pairs), `metrics` (SSIM and the opt-in CLIP score, LPIPS, FID), `report` (and `replot` of a stored report) and
`plots`.
"""

from .methods import PRESETS, REGISTRY, MethodSpec, PeerUnavailable, family, method
from .runner import compare_methods, matched_latency, merge_runs, run_methods, summarize

__all__ = ["method", "family", "MethodSpec", "REGISTRY", "PeerUnavailable", "PRESETS", "compare_methods",
           "run_methods", "summarize", "merge_runs", "matched_latency"]
