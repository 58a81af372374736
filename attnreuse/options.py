"""`AttentionReuseConfig`: the plan to follow and how to follow it, validated before any model is touched."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import MAP, MODES
from .plan import Plan, Schedule, as_plan
from .schedule import whole_number

__all__ = ["AttentionReuseConfig", "ATTENTION_KINDS"]

ATTENTION_KINDS = ("all", "self", "cross")


@dataclass(frozen=True)
class AttentionReuseConfig:
    """What to reuse, and when.

    Args:
        plan (`Plan`, or a schedule: `Schedule`, list of 0/1, or str): a plan (see `attnreuse.Plan`), or the paper's
            schedule: 1 = compute, 0 = reuse, one entry per denoiser call, or per sampler step for samplers that
            call the model twice a step. Strings: ``"110010"``, ``"hurry:N:R"``, or a path to a plan or schedule
            JSON.
        layers (`tuple[str]`, *optional*, defaults to all): for a schedule, layer names or glob patterns, e.g.
            ``"up_blocks.3.*"`` or ``"mid_block.attentions.0.transformer_blocks.0.attn1"``. Each must match.
        attention (`str`, *optional*, defaults to ``"all"``): for a schedule, ``"all"``, ``"self"`` or ``"cross"``.
        mode (`str`, *optional*, defaults to ``"map"``): for a schedule, what a self-attention layer keeps for its
            reuse calls. ``"map"``: A, the paper's method. ``"qk"``: Q and K (the same A up to rounding,
            recomputed by flash attention at reuse; memory linear in tokens). ``"output"``: the attention output
            itself (PAB-style broadcast, not the paper's method). ``"auto"``: the map where it is small, else Q and
            K. Cross-attention is an exact output cache in every mode. A `Plan`'s units carry their own mode and
            layers, so these three options are refused with one.

    Args to tinker with:
        cache_dtype (`torch.dtype`, *optional*, defaults to the model's dtype): dtype the maps are kept in
            (``torch.float16`` halves the cache; ``torch.float8_e4m3fn`` halves it again, stored scaled so that
            small probabilities survive). On a CPU with AMX, ``torch.bfloat16`` also makes reuse calls faster.
            With a 16-bit map in another dtype than the model's, a store call's output is the kept map times V,
            as a reuse computes it.
        max_cache_bytes (`int`, *optional*): the attention cache, with the map memory kept for the next store,
            never holds more. A layer whose choice would not fit beside the layers before it keeps something
            smaller (map -> Q and K) or nothing (it then computes at reuse calls), chosen at its first store from
            shapes alone. What modules keep for a plan's branch, blocks and call units is not counted.
        kernels (`bool`, *optional*, defaults to `True`): use the Triton store and reuse kernels where they pass
            their check on this GPU; `False` runs plain torch (to measure one against the other).
    """

    plan: Plan
    layers: tuple[str, ...] | None = None
    attention: str = "all"
    cache_dtype: torch.dtype | None = None
    mode: str | None = None
    max_cache_bytes: int | None = None
    kernels: bool = True

    def __post_init__(self):
        object.__setattr__(self, "plan", as_plan(self.plan))  # parsed once, here, before any model is touched
        object.__setattr__(self, "layers", _layer_patterns(self.layers))
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}.")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        self._check_plan_options()
        if self.cache_dtype is not None and not (isinstance(self.cache_dtype, torch.dtype)
                                                 and self.cache_dtype.is_floating_point):
            raise ValueError(f"cache_dtype must be a floating torch.dtype such as torch.float16, got "
                             f"{self.cache_dtype!r}.")
        if self.max_cache_bytes is not None:
            object.__setattr__(self, "max_cache_bytes", whole_number(self.max_cache_bytes, "max_cache_bytes"))
        if not isinstance(self.kernels, bool):
            raise TypeError(f"kernels must be True or False, got {self.kernels!r}.")

    @property
    def schedule(self) -> Plan:
        """The plan, under the field's first name."""
        return self.plan

    @property
    def attention_mode(self) -> str:
        """The mode a schedule's attention unit reuses in."""
        return self.mode or MAP

    def _check_plan_options(self) -> None:
        """A plan written as a schedule takes `mode`, `layers` and `attention`; a Plan says them in its units."""
        if isinstance(self.plan, Schedule):
            return
        given = {name: value for name, value in (("mode", self.mode), ("layers", self.layers),
                                                 ("attention", None if self.attention == "all" else self.attention))
                 if value is not None}
        if given:
            name, value = next(iter(given.items()))
            raise ValueError(f"{name}={value!r} applies to a schedule (bits), but this is a Plan whose units say what "
                             "they reuse and where; set it in the plan's unit instead, e.g. Plan.attention(bits, "
                             "mode=..., layers=[...]).")


def _layer_patterns(layers) -> tuple[str, ...] | None:
    """The layer filter as a tuple of names or patterns (None: every layer)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = (layers,)
    elif not isinstance(layers, (list, tuple, set, frozenset)):
        raise TypeError(f"layers must be a layer name, a pattern or a list of them, got {type(layers).__name__}.")
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers=[] selects no layer; pass layers=None (the default) for every layer.")
    bad = [p for p in layers if not isinstance(p, str) or not p]
    if bad:
        raise TypeError(f"layers holds {bad[0]!r}; each entry is a layer name or a glob pattern (a string).")
    return layers
