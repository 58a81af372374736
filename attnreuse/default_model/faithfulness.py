"""Does an image show what its caption says? A rule-based checker for captions of the shapes grammar.

It measures prompt following where CLIP cannot be used: pixels are grouped by color family (nearest hue of
the six named colors, among saturated pixels), connected components give the objects, the fill ratio of a
component's bounding box gives its shape (square ~1, circle ~pi/4, triangle ~1/2), its extent the size, and
bounding-box centres the position or relation (a triangle's centroid sits low, its box centre does not).
"""

from __future__ import annotations

import colorsys
from collections import Counter

import numpy as np

from .shapes import COLORS, IMAGE_SIZE, parse_caption

__all__ = ["check", "find_objects", "pass_rates"]

_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in COLORS.items()}
_CHROMA = np.array([(max(rgb) - min(rgb)) / 255 for rgb in COLORS.values()])
MIN_AREA = 12  # pixels (at 64x64); smaller specks are noise
_SQUARE_FILL, _CIRCLE_FILL = 0.9, 0.685  # measured on renders: squares ~1, circles 0.76-0.81, triangles 0.52-0.61
SMALL_MAX_EXTENT = 17.5  # bounding-box side in pixels (at 64x64): small shapes are 10-15, large ones 22-29


def _coverage(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the nearest color family (index into COLORS) by hue, and how much of that color the pixel
    carries (0 on the background, 1 inside a shape), from its chroma: the background has none."""
    rgb = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 or image.max() > 1.5 else 1.0)
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-6)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    ref = np.array(list(_HUES.values()))
    dist = np.abs(hue[..., None] - ref)
    family = np.minimum(dist, 360 - dist).argmin(axis=-1)
    coverage = np.clip(chroma / _CHROMA[family], 0.0, 1.0)
    return family, np.where(chroma > 0.06, coverage, 0.0)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x) pixel coordinates."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(pixels))
    return out


def find_objects(image: np.ndarray) -> list[dict]:
    """The colored objects of an image (H, W, 3; uint8 or floats in [0, 1]), largest first.

    Objects are 4-connected pixels of one color family at least half covered. Their area, width and height
    are measured from the soft coverage (sub-pixel), so that the fill ratio area / (width * height) tells
    squares (1), circles (pi/4) and triangles (1/2) apart even at 10 pixels across.
    """
    image = np.asarray(image)
    scale = IMAGE_SIZE / image.shape[1]
    family, coverage = _coverage(image)
    objects = []
    for index, color in enumerate(COLORS):
        soft = np.where(family == index, coverage, 0.0)
        for pixels in _components(soft >= 0.5):
            (y0, x0), (y1, x1) = pixels.min(axis=0), pixels.max(axis=0)
            window = soft[max(y0 - 1, 0):y1 + 2, max(x0 - 1, 0):x1 + 2]  # the partly covered rim too
            area = float(window.sum())
            if area * scale * scale < MIN_AREA:
                continue
            width, height = float(window.max(axis=0).sum()), float(window.max(axis=1).sum())
            fill = area / (width * height)
            shape = "square" if fill >= _SQUARE_FILL else "circle" if fill >= _CIRCLE_FILL else "triangle"
            objects.append({"color": color, "shape": shape, "fill": fill, "area": area * scale * scale,
                            "extent": max(width, height) * scale, "cx": float(x0 + x1 + 1) / 2 * scale,
                            "cy": float(y0 + y1 + 1) / 2 * scale})  # bounding-box centre
    return sorted(objects, key=lambda o: -o["area"])


def _position_holds(obj, position) -> bool:
    third = IMAGE_SIZE / 3
    x, y = obj["cx"], obj["cy"]
    return {"on the left": x < third, "on the right": x > 2 * third, "at the top": y < third,
            "at the bottom": y > 2 * third,
            "in the center": third <= x <= 2 * third and third <= y <= 2 * third}[position]


def _relation_holds(a, b, relation) -> bool:
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    horizontal = abs(dx) > abs(dy)
    return {"left of": horizontal and dx < 0, "right of": horizontal and dx > 0,
            "above": not horizontal and dy < 0, "below": not horizontal and dy > 0}[relation]


def check(image: np.ndarray, text: str) -> dict:
    """Which parts of the caption hold in the image.

    Returns ``{"color", "shape", "size", "position", "relation", "count", "ok"}``: booleans, None where the
    caption does not say (no size word, no position); ``ok`` is True when every stated part holds.
    """
    spec = parse_caption(text)
    objects = find_objects(image)
    found = []
    for want in spec["objects"]:
        match = next((o for o in objects if o["color"] == want["color"]), None)
        found.append(match)
    color = all(o is not None for o in found)
    shape = color and all(o["shape"] == w["shape"] for o, w in zip(found, spec["objects"]))
    sized = [(o, w["size"]) for o, w in zip(found, spec["objects"]) if w["size"]]
    size = None if not sized else color and all(
        (o["extent"] <= SMALL_MAX_EXTENT) == (s == "small") for o, s in sized)
    position = relation = None
    if spec["position"]:
        position = color and _position_holds(found[0], spec["position"])
    if spec["relation"]:
        relation = color and _relation_holds(found[0], found[1], spec["relation"])
    result = {"color": color, "shape": shape, "size": size, "position": position, "relation": relation,
              "count": len(objects) == len(spec["objects"])}
    result = {k: None if v is None else bool(v) for k, v in result.items()}
    result["ok"] = all(v for v in result.values() if v is not None)
    result["objects"] = objects
    return result


def pass_rates(images, prompts: list[str]) -> dict:
    """Pass rate of `check` over images and their captions, overall and per part (color, shape, size, position,
    relation, count), with each image's verdict."""
    results = [check(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
    parts, stated = Counter(), Counter()
    for r in results:
        for part in ("color", "shape", "size", "position", "relation", "count"):
            if r[part] is not None:
                stated[part] += 1
                parts[part] += r[part]
    return {"pass_rate": float(np.mean([r["ok"] for r in results])), "n": len(results),
            "parts": {p: parts[p] / stated[p] for p in stated}, "passed": [r["ok"] for r in results]}
