"""The planner's reuse levels on one denoiser: what level l at a call reuses.

Level 0 computes everything and level `top` reuses the whole call. Between them, on a UNet, level l reuses the
branch below depth `top - l` (DeepCache's mechanism at every depth: deeper levels keep fewer up layers running);
on a transformer, level l reuses the residuals of the last blocks, more of them at deeper levels, the first block
always computing (FirstBlockCache's split at the deepest level, FORA-like reuse of most blocks between).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import Unit
from ..units import branch_layers, transformer_blocks

__all__ = ["Levels", "SPANS"]

SPANS = 6  # block levels of a transformer (fewer where it has fewer blocks)


@dataclass(frozen=True)
class Levels:
    """`top` (the whole call) and, for a transformer, `spans[j]`: the blocks that levels j + 1 and deeper reuse."""

    top: int
    spans: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def of(cls, model) -> Levels:
        """The levels of a UNet (its branch depths) or of a transformer (spans of its last blocks)."""
        depths = sum(kind == "pair" for kind, _ in branch_layers(model)[2])
        if depths:
            return cls(depths + 1)
        blocks = transformer_blocks(model)
        count = min(SPANS, len(blocks) - 1)
        if count < 1:
            return cls(1)
        starts = [len(blocks)] + [len(blocks) - round(j * (len(blocks) - 1) / count) for j in range(1, count + 1)]
        return cls(count + 1, tuple(tuple(blocks[starts[j + 1]:starts[j]]) for j in range(count)))

    def units(self, levels) -> dict[str, Unit]:
        """The units (all but attention) of a plan whose call c reuses level `levels[c]`."""
        top, units = self.top, {}
        if self.spans:
            for j, span in enumerate(self.spans, 1):
                units[f"blocks{j}"] = Unit("blocks", [0 if j <= lv < top else 1 for lv in levels], layers=list(span))
        elif top > 1:
            units["branch"] = Unit("branch", [0 if 0 < lv < top else 1 for lv in levels],
                                   depths=[top - lv if 0 < lv < top else 1 for lv in levels])
        units["call"] = Unit("call", [0 if lv == top else 1 for lv in levels])
        return units
