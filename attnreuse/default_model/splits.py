"""Every seed convention of the default model's data, in one place, so that no split ever overlaps another.

Training draws items of the training seed itself; held-out images (VAE reconstruction) come from the seed plus
`HELD_OUT_OFFSET`; captions for measuring come from items of a split's seed plus `CAPTION_OFFSET`, which training
never draws. The caption splits: evaluation (the figures), validation (choosing the guidance scale) and
calibration (what searches optimise).
"""

from __future__ import annotations

from .shapes import sample

__all__ = ["HELD_OUT_OFFSET", "CAPTION_OFFSET", "EVALUATION", "VALIDATION", "CALIBRATION", "held_out_captions",
           "captions"]

HELD_OUT_OFFSET = 1_000_003  # held-out images: items of seed + this; training uses the seed itself
CAPTION_OFFSET = 2_000_003  # captions for measuring: items of a split's seed + this, never trained on
EVALUATION, VALIDATION, CALIBRATION = 0, 1, 3  # the caption splits' seeds


def held_out_captions(count: int, two_shapes: bool, seed: int = EVALUATION) -> list[str]:
    """`count` captions of the grammar (one or two shapes) from the split of `seed`."""
    return [sample(seed + CAPTION_OFFSET, i, two_shapes)[1] for i in range(count)]


def captions(count: int, seed: int = EVALUATION) -> list[str]:
    """`count` captions of the split of `seed`: the first half (rounded up) with one shape, the rest with two."""
    return held_out_captions(count - count // 2, False, seed) + held_out_captions(count // 2, True, seed)
