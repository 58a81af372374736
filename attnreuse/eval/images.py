"""Images as the reports hold them: uint8 arrays, labelled grids, files written whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import atomic_write

__all__ = ["to_uint8", "image_grid", "save_image"]


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] as uint8 (what a PNG holds)."""
    return np.clip(np.rint(np.asarray(images, dtype=np.float64) * 255), 0, 255).astype(np.uint8)


def image_grid(images, columns: int = 8, upscale: int = 2, pad: int = 2, labels=None):
    """A PIL image of (N, H, W, 3) images (float in [0, 1] or uint8) in rows of `columns`, enlarged `upscale`
    times (nearest); `labels` (one per row) are written left of the rows."""
    from PIL import Image, ImageDraw

    images = images if np.asarray(images).dtype == np.uint8 else to_uint8(images)
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
    grid = Image.fromarray(canvas)
    grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
    if not labels:
        return grid
    margin = 7 * max(len(label) for label in labels) + 8
    framed = Image.new("RGB", (grid.width + margin, grid.height), "white")
    framed.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(framed)
    for r, label in enumerate(labels[:rows]):
        draw.text((4, (pad + r * (h + pad) + h // 2) * upscale - 5), label, fill="black")
    return framed


def save_image(image, path) -> Path:
    """An image (PIL, or an (H, W, 3) array: float in [0, 1] or uint8) written atomically, in the format its file
    name says."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        image = Image.fromarray(array if array.dtype == np.uint8 else to_uint8(array))
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))
