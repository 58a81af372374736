"""The faithfulness checker: right on every ground-truth render, catches wrong captions, quiet on noise."""

import numpy as np
import pytest

from attnreuse.default_model.faithfulness import check, find_objects
from attnreuse.default_model.shapes import Scene, Shape, render, sample


def test_checker_is_right_on_every_ground_truth_render():
    failures = []
    for i in range(1500):
        image, text, _ = sample(1, i)
        result = check(image, text)
        if not result["ok"]:
            failures.append((i, text, {k: v for k, v in result.items() if k != "objects"}))
    assert failures == []


def _scene(*shapes, position=None, relation=None):
    return Scene(tuple(shapes), 245, position=position, relation=relation)


@pytest.mark.parametrize("wrong_caption, part", [
    ("a blue circle on the left", "color"),
    ("a red square on the left", "shape"),
    ("a red triangle on the left", "shape"),
    ("a large red circle on the left", "size"),
    ("a red circle on the right", "position"),
    ("a red circle in the center", "position"),
])
def test_checker_catches_wrong_one_shape_captions(wrong_caption, part):
    image = render(_scene(Shape("circle", "red", 12, 32, 6, "small"), position="on the left"))
    assert check(image, "a small red circle on the left")["ok"]
    result = check(image, wrong_caption)
    assert result[part] is False and not result["ok"]


@pytest.mark.parametrize("wrong_caption, part", [
    ("a green square right of a purple triangle", "relation"),
    ("a green square above a purple triangle", "relation"),
    ("a purple triangle left of a green square", "relation"),
    ("a green square left of a purple circle", "shape"),
    ("a green square left of a orange triangle", "color"),
    ("a green square", "count"),
])
def test_checker_catches_wrong_two_shape_captions(wrong_caption, part):
    image = render(_scene(Shape("square", "green", 16, 30, 10), Shape("triangle", "purple", 46, 34, 9),
                          relation="left of"))
    assert check(image, "a green square left of a purple triangle")["ok"]
    result = check(image, wrong_caption)
    assert result[part] is False and not result["ok"]


def test_checker_on_noise_and_blank_images():
    blank = np.full((64, 64, 3), 250, np.uint8)
    assert find_objects(blank) == []
    assert not check(blank, "a red circle")["ok"]
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not check(noise, "a red circle")["ok"]
    floats = sample(0, 3)[0].astype(np.float32) / 255  # floats in [0, 1] work as uint8 does
    assert check(floats, sample(0, 3)[1])["ok"]
