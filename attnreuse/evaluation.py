"""Generating held-out captions and measuring prompt following and fidelity (grows with the evaluation issue)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm

from .faithfulness import check
from .shapes import sample

__all__ = ["held_out_captions", "generate", "faithfulness", "image_grid"]

CAPTION_OFFSET = 2_000_003  # held-out captions come from items of seed + this, never trained on


def held_out_captions(count: int, two_shapes: bool, seed: int = 0) -> list[str]:
    """`count` captions of the grammar (one or two shapes) drawn from items the training never saw."""
    return [sample(seed + CAPTION_OFFSET, i, two_shapes)[1] for i in range(count)]


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], batch_size: int = 50, progress: bool = False,
             **kwargs) -> np.ndarray:
    """Images (N, H, W, 3) uint8 for prompts and per-image seeds, in batches (each image its own generator)."""
    device = pipe.unet.device
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator(device).manual_seed(s) for s in seeds[chunk]]
        images = pipe(prompts[chunk], generator=generators, output_type="np", **kwargs).images
        out.append(np.clip(np.rint(np.asarray(images) * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def faithfulness(images: np.ndarray, prompts: list[str]) -> dict:
    """Pass rate of the faithfulness checker, overall and per part (color, shape, size, position, relation)."""
    results = [check(image, prompt) for image, prompt in zip(images, prompts)]
    parts = Counter()
    stated = Counter()
    for r in results:
        for part in ("color", "shape", "size", "position", "relation", "count"):
            if r[part] is not None:
                stated[part] += 1
                parts[part] += r[part]
    return {"pass_rate": float(np.mean([r["ok"] for r in results])), "n": len(results),
            "parts": {p: parts[p] / stated[p] for p in stated}, "passed": [r["ok"] for r in results]}


def image_grid(images: np.ndarray, columns: int = 8, upscale: int = 2, pad: int = 2):
    """A PIL image of a grid of (N, H, W, 3) uint8 images, enlarged `upscale` times (nearest) to be seen."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
    grid = Image.fromarray(canvas)
    return grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
