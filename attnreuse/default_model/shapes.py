"""A procedural data set of captioned shapes, deterministic by seed, generated on the fly.

Images are 64x64 RGB on a plain light background with one or two filled, non-overlapping shapes. Captions:

    one shape:  a [size] <color> <shape> [on the left | on the right | at the top | at the bottom | in the center]
    two shapes: a [size] <color> <shape> <left of | right of | above | below> a [size] <color> <shape>

The two shapes of a caption have different colors, so that a caption names each of them unambiguously.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = ["COLORS", "SHAPES", "SIZES", "POSITIONS", "RELATIONS", "Shape", "Scene", "sample_scene", "render",
           "caption", "parse_caption", "sample", "batch", "VOCABULARY", "IMAGE_SIZE"]

IMAGE_SIZE = 64
COLORS = {  # saturated, far apart in hue
    "red": (220, 30, 30), "orange": (245, 135, 15), "yellow": (235, 215, 20),
    "green": (30, 160, 50), "blue": (35, 75, 220), "purple": (135, 45, 190),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (5, 7), "large": (11, 14)}  # half-extent in pixels at 64x64; unsized shapes draw 6..13
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
RELATIONS = ("left of", "right of", "above", "below")
VOCABULARY = tuple(sorted({"a", "on", "the", "at", "in", "of", "left", "right", "top", "bottom", "center",
                           "above", "below", *COLORS, *SHAPES, *SIZES}))
_THIRD = IMAGE_SIZE / 3


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    cx: float
    cy: float
    r: float  # half-extent in pixels
    size: str | None = None  # the size word of the caption, if any


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: int  # gray level of the background
    position: str | None = None  # one shape
    relation: str | None = None  # two shapes: shapes[0] <relation> shapes[1]


def _half_extent(rng, size):
    lo, hi = SIZES[size] if size else (6, 13)
    return float(rng.uniform(lo, hi))


def _position_box(position, r):
    """Range of the centre (x0, x1, y0, y1) for a single shape's position word."""
    lo, hi = r + 1, IMAGE_SIZE - r - 1
    third, two = _THIRD, 2 * _THIRD
    x = {"on the left": (lo, third - 2), "on the right": (two + 2, hi), "in the center": (third + 2, two - 2)}
    y = {"at the top": (lo, third - 2), "at the bottom": (two + 2, hi), "in the center": (third + 2, two - 2)}
    middle = (third + 2, two - 2)
    if position in ("on the left", "on the right"):
        return (*x[position], *middle)
    if position in ("at the top", "at the bottom"):
        return (*middle, *y[position])
    if position == "in the center":
        return (*middle, *middle)
    return (lo, hi, lo, hi)


def _object(rng, color, with_size):
    size = rng.choice(list(SIZES)) if with_size and rng.random() < 0.5 else None
    return str(rng.choice(SHAPES)), color, size


def sample_scene(rng: np.random.Generator, two_shapes: bool | None = None) -> Scene:
    """One random scene; `two_shapes` None draws one or two shapes with equal odds."""
    if two_shapes is None:
        two_shapes = bool(rng.random() < 0.5)
    background = int(rng.integers(232, 256))
    colors = rng.choice(list(COLORS), size=2, replace=False)
    if not two_shapes:
        shape, color, size = _object(rng, str(colors[0]), True)
        position = str(rng.choice(POSITIONS)) if rng.random() < 0.8 else None
        r = _half_extent(rng, size)
        if position == "in the center" or position is None:
            r = min(r, _THIRD / 2 + 3) if position else r
        x0, x1, y0, y1 = _position_box(position, r)
        if x0 > x1 or y0 > y1:  # a large shape does not fit its third: shrink it
            size, r = "small", _half_extent(rng, "small")
            x0, x1, y0, y1 = _position_box(position, r)
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        return Scene((Shape(shape, color, cx, cy, r, size),), background, position=position)
    relation = str(rng.choice(RELATIONS))
    a = _object(rng, str(colors[0]), True)
    b = _object(rng, str(colors[1]), True)
    ra, rb = _half_extent(rng, a[2]), _half_extent(rng, b[2])
    for _ in range(100):  # rejection sampling: separated along the relation's axis, inside the image
        gap = ra + rb + rng.uniform(4, 14)
        along = rng.uniform(-gap / 3, gap / 3)  # the other axis differs by at most a third of the distance
        dx, dy = {"left of": (-gap, along), "right of": (gap, along), "above": (along, -gap),
                  "below": (along, gap)}[relation]
        cx = rng.uniform(ra + 1, IMAGE_SIZE - ra - 1)
        cy = rng.uniform(ra + 1, IMAGE_SIZE - ra - 1)
        bx, by = cx - dx, cy - dy  # a = b + d
        if rb + 1 <= bx <= IMAGE_SIZE - rb - 1 and rb + 1 <= by <= IMAGE_SIZE - rb - 1:
            break
    else:
        return sample_scene(rng, two_shapes=True)
    shapes = (Shape(a[0], a[1], cx, cy, ra, a[2]), Shape(b[0], b[1], bx, by, rb, b[2]))
    return Scene(shapes, background, relation=relation)


def _coverage(shape: Shape, scale: int) -> tuple[slice, slice, np.ndarray]:
    """How many of each pixel's scale x scale sub-pixels the shape covers, inside its bounding window of whole
    pixels (rows, cols, counts): computing only there makes rendering several times faster."""
    lo = lambda c: max(0, int(np.floor(c - shape.r)) - 1)  # noqa: E731
    hi = lambda c: min(IMAGE_SIZE, int(np.ceil(c + shape.r)) + 1)  # noqa: E731
    rows, cols = slice(lo(shape.cy), hi(shape.cy)), slice(lo(shape.cx), hi(shape.cx))
    y = (np.arange(rows.start * scale, rows.stop * scale)[:, None] + 0.5) / scale
    x = (np.arange(cols.start * scale, cols.stop * scale)[None, :] + 0.5) / scale
    dx, dy, r = x - shape.cx, y - shape.cy, shape.r
    if shape.shape == "circle":
        mask = dx * dx + dy * dy <= r * r
    elif shape.shape == "square":
        mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    else:  # upright triangle: apex at the top, base at the bottom, as wide as it is tall
        t = (dy + r) / (2 * r)
        mask = (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
    h, w = mask.shape[0] // scale, mask.shape[1] // scale
    return rows, cols, mask.reshape(h, scale, w, scale).sum(axis=(1, 3))


def render(scene: Scene, scale: int = 4) -> np.ndarray:
    """The scene as uint8 RGB (H, W, 3), anti-aliased by `scale`x supersampling: each pixel is the mean of its
    sub-pixels, summed in integers (the shapes never overlap), so the result is exact."""
    total = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), scene.background * scale * scale, dtype=np.int64)
    for shape in scene.shapes:
        rows, cols, counts = _coverage(shape, scale)
        total[rows, cols] += counts[..., None] * (np.array(COLORS[shape.color]) - scene.background)
    return np.clip(np.rint(total / (scale * scale)), 0, 255).astype(np.uint8)


def _phrase(shape: Shape) -> str:
    return " ".join(w for w in ("a", shape.size, shape.color, shape.shape) if w)


def caption(scene: Scene) -> str:
    if len(scene.shapes) == 1:
        return " ".join(w for w in (_phrase(scene.shapes[0]), scene.position) if w)
    return f"{_phrase(scene.shapes[0])} {scene.relation} {_phrase(scene.shapes[1])}"


_OBJECT = (rf"a (?:(?P<size{{i}}>{'|'.join(SIZES)}) )?(?P<color{{i}}>{'|'.join(COLORS)}) "
           rf"(?P<shape{{i}}>{'|'.join(SHAPES)})")
_ONE = re.compile(rf"^{_OBJECT.format(i=0)}(?: (?P<position>{'|'.join(POSITIONS)}))?$")
_TWO = re.compile(rf"^{_OBJECT.format(i=0)} (?P<relation>{'|'.join(RELATIONS)}) {_OBJECT.format(i=1)}$")


def parse_caption(text: str) -> dict:
    """A caption of the grammar as ``{"objects": [{"size", "color", "shape"}, ...], "position", "relation"}``."""
    text = " ".join(text.lower().split())
    match = _ONE.match(text) or _TWO.match(text)
    if match is None:
        raise ValueError(f"Caption {text!r} is not in the grammar: 'a [size] <color> <shape> [position]' or "
                         "'a [size] <color> <shape> <left of|right of|above|below> a [size] <color> <shape>'.")
    groups = match.groupdict()
    count = 2 if groups.get("relation") else 1
    objects = [{k: groups.get(f"{k}{i}") for k in ("size", "color", "shape")} for i in range(count)]
    return {"objects": objects, "position": groups.get("position"), "relation": groups.get("relation")}


def sample(seed: int, index: int, two_shapes: bool | None = None) -> tuple[np.ndarray, str, Scene]:
    """Item `index` of the data set with this seed: (uint8 image, caption, scene); the same on every machine."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, two_shapes)
    return render(scene), caption(scene), scene


def batch(seed: int, start: int, size: int, two_shapes: bool | None = None):
    """Items start..start+size-1 as (float32 images (B, 3, 64, 64) in [-1, 1], captions, scenes)."""
    items = [sample(seed, i, two_shapes) for i in range(start, start + size)]
    images = np.stack([im for im, _, _ in items]).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return images, [c for _, c, _ in items], [s for _, _, s in items]
