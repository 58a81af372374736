"""What a denoiser offers to a plan, and what each of its parts does at each call of a generation.

`Layout` lists a model's attention layers, transformer blocks and, for a UNet, the layers of its down and up paths
(the branch DeepCache reuses). `resolve` turns a plan into one action per actor (attention layer, wrapped module,
the call itself) per call: pure functions of the plan and the layout, computed once per generation.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .cache import CALL, output_key, residual_key
from .plan import Plan
from .state import COMPUTE, REUSE, SKIP, STORE

__all__ = ["Layout", "ModuleAction", "branch_layers", "transformer_blocks", "resolve", "slot_drops"]


class ModuleAction(NamedTuple):
    """What a wrapped module does at one call: run it (or add its kept residual to the fresh input), return what it
    kept (`SKIP`), and whether to keep its output (for the branch) or its residual (for its blocks unit). A tuple, so
    that `torch.compile` guards on its values."""

    run: str = COMPUTE  # COMPUTE, REUSE (residual) or SKIP
    keep_output: bool = False
    keep_residual: bool = False


@dataclass(frozen=True)
class Layout:
    """A model's parts that plans can name."""

    attention: dict[str, str]  # layer name -> "self" or "cross"
    blocks: tuple[str, ...] = ()  # transformer blocks whose residual can be reused
    producers: tuple[tuple[str, ...], ...] = ()  # the UNet's down path: the modules of each skip connection 1..
    mid: str | None = None
    up: tuple[tuple[str, tuple[str, ...]], ...] = ()  # the up path in order: ("pair" | "sampler", module names)

    @property
    def depths(self) -> int:
        """How many up layers a branch can keep running (0: no branch)."""
        return sum(kind == "pair" for kind, _ in self.up)

    def skipped(self, depth: int) -> frozenset[str]:
        """The modules a branch reuse that runs the last `depth` up layers returns from its cache."""
        pairs = [i for i, (kind, _) in enumerate(self.up) if kind == "pair"]
        if not 1 <= depth <= len(pairs):
            raise ValueError(f"a branch depth runs 1 to {len(pairs)} up layers of this model, got {depth}.")
        first_fresh = pairs[len(pairs) - depth]
        names = {n for _, modules in self.up[:first_fresh] for n in modules}
        names.update(n for modules in self.producers[depth - 1:] for n in modules)
        return frozenset(names | {self.mid})

    @property
    def modules(self) -> tuple[str, ...]:
        """Every module a plan may wrap: the branch's layers and the transformer blocks."""
        branch = [n for modules in self.producers for n in modules] + [n for _, ms in self.up for n in ms]
        return tuple(dict.fromkeys(branch + ([self.mid] if self.mid else []) + list(self.blocks)))

    def within(self, layer: str, modules) -> bool:
        """Whether an attention layer lies inside one of `modules`."""
        return any(layer.startswith(m + ".") for m in modules)

    def match(self, patterns, names) -> list[str]:
        if patterns is None:
            return list(names)
        return [n for n in names if any(n == p or fnmatch.fnmatchcase(n, p) or n.startswith(p + ".")
                                        for p in patterns)]


def branch_layers(model) -> tuple[tuple, str | None, tuple]:
    """(down producers, mid block, up path) of a diffusers UNet, or empty where the model is not one whose skip
    connections pair up (each up layer consumes one down output, conv_in's first)."""
    parts = ("down_blocks", "mid_block", "up_blocks", "conv_in")
    if not all(hasattr(model, a) for a in parts) or model.mid_block is None:
        return (), None, ()
    producers, up = [], []
    for i, block in enumerate(model.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            producers.append((f"down_blocks.{i}.resnets.{j}",) + ((f"down_blocks.{i}.attentions.{j}",) if attentions
                                                                  else ()))
        producers += [(f"down_blocks.{i}.downsamplers.{k}",) for k in range(len(block.downsamplers or []))]
    for i, block in enumerate(model.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            up.append(("pair", (f"up_blocks.{i}.resnets.{j}",) + ((f"up_blocks.{i}.attentions.{j}",) if attentions
                                                                  else ())))
        up += [("sampler", (f"up_blocks.{i}.upsamplers.{k}",)) for k in range(len(block.upsamplers or []))]
    if sum(kind == "pair" for kind, _ in up) != len(producers) + 1:
        return (), None, ()
    return tuple(producers), "mid_block", tuple(up)


def transformer_blocks(model) -> list[str]:
    """The transformer blocks of a model, in the order they run: a UNet's Transformer2DModels, else the members of a
    transformer's top-level block lists (`transformer_blocks`, `single_transformer_blocks`, `blocks`)."""
    model = getattr(model, "_orig_mod", model)  # a compiled model's names are those of the model inside
    inner = [n for n, m in model.named_modules() if n and type(m).__name__ == "Transformer2DModel"]
    if inner:
        return inner
    return [f"{name}.{i}" for name, child in model.named_children()
            if isinstance(child, torch.nn.ModuleList) and name.endswith("blocks")
            for i, block in enumerate(child) if "TransformerBlock" in type(block).__name__]


def _next_active(active: list[bool], c: int) -> int | None:
    return next((d for d in range(c + 1, len(active)) if active[d]), None)


def _bit_actions(bits, active) -> list[str]:
    """Per call: SKIP where the actor does not run, REUSE at a 0, STORE at a 1 whose next active call reuses (the
    paper's lookahead), else COMPUTE."""
    out = []
    for c, bit in enumerate(bits):
        if not active[c]:
            out.append(SKIP)
        elif not bit:
            out.append(REUSE)
        else:
            nxt = _next_active(active, c)
            out.append(STORE if nxt is not None and not bits[nxt] else COMPUTE)
    return out


def _branch(plan: Plan, layout: Layout, body: list[bool]) -> tuple[list, list]:
    """Per call, the modules the branch skips and the modules it keeps (at its compute calls, for the reuse calls
    up to its next compute call)."""
    unit = next((u for u in plan.units.values() if u.kind == "branch"), None)
    n = len(plan)
    if unit is None:
        return [frozenset()] * n, [frozenset()] * n
    if not layout.depths:
        raise ValueError("this plan has a branch unit, but the model is not a UNet whose branch can be reused.")
    skipped = [layout.skipped(unit.depths[c]) if body[c] and not unit.bits[c] else frozenset() for c in range(n)]
    kept = [frozenset()] * n
    for c in range(n):
        if body[c] and unit.bits[c]:
            later = []
            for d in range(c + 1, n):
                if body[d] and unit.bits[d]:
                    break
                later.append(skipped[d])
            kept[c] = frozenset().union(*later)
    return skipped, kept


def resolve(plan: Plan, layout: Layout, layers: list[str]) -> list[tuple]:
    """Per call, one action per actor: each of `layers` (attention: COMPUTE, STORE, REUSE or SKIP), each of
    `layout.modules` (a `ModuleAction`), then the call itself (COMPUTE, STORE or REUSE)."""
    n = len(plan)
    call = next((u for u in plan.units.values() if u.kind == "call"), None)
    call_bits = call.bits if call is not None else (1,) * n
    body = [bool(b) for b in call_bits]
    skipped, kept = _branch(plan, layout, body)
    modules = [_module_column(plan, layout, name, body, skipped, kept) for name in layout.modules]
    reused = [frozenset(m for m, column in zip(layout.modules, modules) if column[c].run == REUSE) for c in range(n)]
    hidden = [skipped[c] | reused[c] for c in range(n)]  # attention inside these does not run
    columns = [_attention_column(plan, layout, name, body, hidden) for name in layers] + modules
    columns.append(_bit_actions(call_bits, [True] * n))
    return [tuple(column[c] for column in columns) for c in range(n)]


def _attention_column(plan, layout, name, body, hidden) -> list[str]:
    units = [u for u in plan.units.values() if u.kind == "attention" and layout.match(u.layers, [name])]
    if len(units) > 1:
        raise ValueError(f"attention layer {name!r} belongs to {len(units)} attention units; give each layer one.")
    active = [body[c] and not layout.within(name, hidden[c]) for c in range(len(plan))]
    bits = units[0].bits if units else (1,) * len(plan)
    return _bit_actions(bits, active)


def _module_column(plan, layout, name, body, skipped, kept) -> list[ModuleAction]:
    units = [u for u in plan.units.values() if u.kind == "blocks" and name in layout.blocks
             and layout.match(u.layers, [name])]
    active = [body[c] and name not in skipped[c] and not layout.within(name, skipped[c]) for c in range(len(plan))]
    residual = _bit_actions(units[0].bits if units else (1,) * len(plan), active)
    return [ModuleAction(SKIP if not active[c] else REUSE if residual[c] == REUSE else COMPUTE,
                         name in kept[c] and active[c], residual[c] == STORE) for c in range(len(plan))]


def _events(actions: list[tuple], layers: list[str], modules) -> dict[str, list[str | None]]:
    """Per slot key and call: "read", "write" or None."""
    events = {}
    for i, name in enumerate(layers):
        events[name] = ["read" if a[i] == REUSE else "write" if a[i] == STORE else None for a in actions]
    for j, name in enumerate(modules, start=len(layers)):
        events[output_key(name)] = ["read" if a[j].run == SKIP else "write" if a[j].keep_output else None
                                    for a in actions]
        events[residual_key(name)] = ["read" if a[j].run == REUSE else "write" if a[j].keep_residual else None
                                      for a in actions]
    events[CALL] = ["read" if a[-1] == REUSE else "write" if a[-1] == STORE else None for a in actions]
    return events


def slot_drops(actions: list[tuple], layers: list[str], modules) -> list[tuple[str, ...]]:
    """Per call, the slots to let go before it runs: those whose next event is a write (the store then starts from
    no slot of its own, so the cache never holds two) or nothing. So calls of one kind start from one cache, and a
    compiled model keeps one graph per kind of call."""
    drops = [[] for _ in actions]
    for key, column in _events(actions, layers, modules).items():
        written = False
        for c, event in enumerate(column):
            if written and next((e for e in column[c:] if e), None) != "read":
                drops[c].append(key)
                written = False
            written = written or event == "write"
    return [tuple(d) for d in drops]
