"""The paper's utility: PSNR against the full sampler's image of the same prompt and seed, what a search maximises
and every tool reports (Hunter, Dudziak et al. 2024, sec. 2.2)."""

from __future__ import annotations

import numpy as np

__all__ = ["PSNR_CAP", "psnr", "mean_psnr"]

PSNR_CAP = 100.0  # dB: an image identical to its reference counts as this, so that means stay finite


def psnr(image, reference, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between two images (arrays in [0, data_range]); inf when identical."""
    image, reference = np.asarray(image, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if image.shape != reference.shape:
        raise ValueError(f"PSNR needs images of one shape, got {image.shape} and {reference.shape}.")
    mse = float(np.mean((image - reference) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def mean_psnr(images, references) -> float:
    """The paper's utility: the mean over images of the PSNR (dB, each capped at PSNR_CAP) against references."""
    return float(np.mean([min(PSNR_CAP, psnr(x, y)) for x, y in zip(images, references, strict=True)]))
