"""Benchmarks: what each reuse mode costs and buys on the SD1.5 and SDXL UNet architectures (random weights from the
published configs), per call and end to end, each figure a ratio to a baseline measured in the same run."""

from .calls import VARIANTS, end_to_end, per_call
from .models import build_unet
from .report import markdown
from .run import PAPER_PHAST_DDIM20, bench, quality

__all__ = ["bench", "quality", "markdown", "build_unet", "per_call", "end_to_end", "VARIANTS", "PAPER_PHAST_DDIM20"]
