"""The captioned-shapes data set: deterministic, in its grammar, rendered as captioned."""

import numpy as np
import pytest

from attnreuse.default_model.shapes import (
    COLORS,
    IMAGE_SIZE,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    Shape,
    caption,
    parse_caption,
    render,
    sample,
)


def test_data_set_is_deterministic_and_well_formed():
    image, text, scene = sample(7, 123)
    image2, text2, _ = sample(7, 123)
    assert text == text2 and np.array_equal(image, image2)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    assert image[0, 0].min() >= 232 and len(set(image[0, 0])) == 1  # plain light gray/white background
    seen_words = set()
    for i in range(400):
        image, text, scene = sample(0, i)
        seen_words.update(text.split())
        assert parse_caption(text)["objects"][0]["color"] == scene.shapes[0].color
        if len(scene.shapes) == 2:
            a, b = scene.shapes
            assert a.color != b.color
            assert np.hypot(a.cx - b.cx, a.cy - b.cy) > a.r + b.r  # no overlap
    for word in [*COLORS, *SHAPES, *SIZES, "left", "right", "top", "bottom", "center", "above", "below"]:
        assert word in seen_words


def test_caption_grammar():
    assert parse_caption("a red circle") == {
        "objects": [{"size": None, "color": "red", "shape": "circle"}], "position": None, "relation": None}
    spec = parse_caption("a small blue triangle left of a large green square")
    assert spec["relation"] == "left of" and [o["size"] for o in spec["objects"]] == ["small", "large"]
    assert parse_caption("a yellow square in the center")["position"] == "in the center"
    for bad in ("a red", "a pink circle", "two red circles", "a red circle near a blue square"):
        with pytest.raises(ValueError, match="not in the grammar"):
            parse_caption(bad)


def _scene(*shapes, position=None, relation=None):
    return Scene(tuple(shapes), 245, position=position, relation=relation)


def test_every_position_and_relation_is_rendered_as_captioned():
    rng_items = [sample(5, i) for i in range(600)]
    positions = {s.position for _, _, s in rng_items if s.position}
    relations = {s.relation for _, _, s in rng_items if s.relation}
    assert positions == set(POSITIONS) and relations == set(RELATIONS)
    assert all(caption(s) == t for _, t, s in rng_items)


def _reference_render(scene, scale=4):
    """The plain definition: every sub-pixel of the full supersampled grid, then the mean of each pixel's."""
    n = IMAGE_SIZE * scale
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / scale
    image = np.full((n, n, 3), scene.background, dtype=np.float64)
    for s in scene.shapes:
        dx, dy, r = x - s.cx, y - s.cy, s.r
        t = (dy + r) / (2 * r)
        mask = {"circle": dx * dx + dy * dy <= r * r, "square": (np.abs(dx) <= r) & (np.abs(dy) <= r),
                "triangle": (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)}[s.shape]
        image[mask] = COLORS[s.color]
    image = image.reshape(IMAGE_SIZE, scale, IMAGE_SIZE, scale, 3).mean(axis=(1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def test_fast_renderer_equals_the_full_grid_definition():
    scenes = [sample(seed, i)[2] for seed in (0, 11) for i in range(150)]
    scenes.append(Scene((Shape("circle", "red", 0.4, 63.7, 12.0),), 240))  # clipped at the image border
    for scene in scenes:
        assert np.array_equal(render(scene), _reference_render(scene)), scene
