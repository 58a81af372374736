"""Image-fidelity metrics against the no-reuse output of the same prompt and seed (the paper's utility)."""

from __future__ import annotations

import numpy as np

__all__ = ["psnr", "image_metrics"]


def psnr(image, reference, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between two images (arrays in [0, data_range]); inf when identical."""
    image, reference = np.asarray(image, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if image.shape != reference.shape:
        raise ValueError(f"PSNR needs images of one shape, got {image.shape} and {reference.shape}.")
    mse = float(np.mean((image - reference) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def image_metrics(images, references) -> dict:
    """Per-image PSNR (dB) and SSIM of (N, H, W, 3) images in [0, 1] against their references, computed with
    torchmetrics (the maintained implementations), as lists."""
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(references, dtype=np.float32)).permute(0, 3, 1, 2)
    if x.shape != y.shape:
        raise ValueError(f"Image metrics need images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
    psnr_db = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")
    return {"psnr_db": psnr_db.tolist(), "ssim": ssim.tolist()}
