"""Which parts of a model a plan touches: the denoiser of a pipeline, its attention layers and their processor
families, and the plan bound to them (`bind`), checked before anything is installed."""

from __future__ import annotations

import fnmatch

import torch

from .attention import family_of
from .options import AttentionReuseConfig
from .plan import Plan, Schedule
from .units import Layout, branch_layers, transformer_blocks

__all__ = ["denoiser", "find_model", "attention_layers", "family", "bind"]


def denoiser(target) -> torch.nn.Module:
    """The denoiser of a pipeline (its `unet` or `transformer`), or the model itself."""
    return find_model(target)[0]


def find_model(target):
    """The denoiser of a pipeline (`unet` or `transformer`) or the model itself, and a scheduler getter."""
    if isinstance(target, torch.nn.Module):
        return target, (lambda: None)
    for attr in ("unet", "transformer"):
        model = getattr(target, attr, None)
        if isinstance(model, torch.nn.Module):
            return model, (lambda: getattr(target, "scheduler", None))  # looked up per call: users swap schedulers
    raise TypeError(
        f"apply_reuse needs a diffusers pipeline with a `unet` or `transformer`, or a model; "
        f"got {type(target).__name__}."
    )


def attention_layers(target) -> dict[str, str]:
    """Names of the attention layers of a pipeline or model, each with ``"self"`` or ``"cross"``."""
    model, _ = find_model(target)
    processors = getattr(model, "attn_processors", None)
    if not processors:
        raise ValueError(f"{type(model).__name__} has no diffusers attention layers, so there is nothing to reuse.")
    names = [key.removesuffix(".processor") for key in processors]
    return {n: "cross" if getattr(model.get_submodule(n), "is_cross_attention", False) else "self" for n in names}


def family(model, name: str):
    """The processor family (`attention.families`) of layer `name`, or a ValueError that says why it has none."""
    attn = model.get_submodule(name)
    found = family_of(attn, attn.processor)
    if isinstance(found, str):
        raise ValueError(f"Layer {name!r} {found}. Set a supported processor (e.g. "
                         "model.set_attn_processor(AttnProcessor2_0())) or leave the layer out with layers=...")
    return found


def bind(model, config: AttentionReuseConfig) -> tuple[Plan, Layout]:
    """The config's plan on this model, with the model's parts it touches: a schedule becomes one attention unit
    over the layers the options select; each unit's layer patterns must match a layer the model has."""
    plan = _placed(model, config)
    return plan, _layout(model, plan)


def _matching(names: list[str], patterns, model, what: str) -> list[str]:
    """The names that the patterns match; each pattern must match one."""
    chosen = set()
    for pattern in patterns:
        hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern) or n.startswith(pattern + ".")]
        if not hits:
            examples = ", ".join(repr(n) for n in names[:3])
            raise ValueError(f"Layer filter {pattern!r} matches no {what} of {type(model).__name__}. Names look like "
                             f"{examples} (see attnreuse.attention_layers).")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def _placed(model, config: AttentionReuseConfig) -> Plan:
    plan = config.plan
    if isinstance(plan, Schedule):
        kinds = attention_layers(model)
        names = [n for n, kind in kinds.items() if config.attention in ("all", kind)]
        if config.layers is not None:
            names = _matching(names, config.layers, model, f"{config.attention} attention layer")
        if not names:
            raise ValueError(f"{type(model).__name__} has no {config.attention}-attention layers to reuse.")
        return Plan.attention(plan.bits, config.attention_mode, names, plan.timesteps, plan.meta)
    for name, unit in plan.units.items():
        if unit.layers is not None and unit.kind in ("attention", "blocks"):
            pool = list(attention_layers(model)) if unit.kind == "attention" else transformer_blocks(model)
            _matching(pool, unit.layers, model, f"{unit.kind} layer (unit {name!r})")
    return plan


def _layout(model, plan: Plan) -> Layout:
    """The actors of `plan` on `model`: attention layers in attention units, blocks in blocks units, the branch."""
    units = list(plan.units.values())
    attention = {}
    if any(u.kind == "attention" for u in units):
        kinds = attention_layers(model)
        for unit in (u for u in units if u.kind == "attention"):
            attention.update({n: kinds[n] for n in (unit.layers and _matching(list(kinds), unit.layers, model,
                                                                              "attention layer")) or kinds})
    pool = transformer_blocks(model)
    blocks = [n for u in units if u.kind == "blocks"
              for n in (_matching(pool, u.layers, model, "block") if u.layers else pool)]
    producers, mid, up = branch_layers(model) if any(u.kind == "branch" for u in units) else ((), None, ())
    if any(u.kind == "branch" for u in units) and not up:
        raise ValueError(f"this plan has a branch unit, but {type(model).__name__} is not a UNet whose branch can be "
                         "reused.")
    for name in attention:
        family(model, name)
    return Layout(attention, tuple(dict.fromkeys(blocks)), producers, mid, up)
