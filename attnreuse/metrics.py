"""Image-fidelity metrics against the no-reuse output of the same prompt and seed (the paper's utility)."""

from __future__ import annotations

import numpy as np

__all__ = ["psnr"]


def psnr(image, reference, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between two images (arrays in [0, data_range]); inf when identical."""
    image, reference = np.asarray(image, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if image.shape != reference.shape:
        raise ValueError(f"PSNR needs images of one shape, got {image.shape} and {reference.shape}.")
    mse = float(np.mean((image - reference) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)
