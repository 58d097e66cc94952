from dataclasses import replace

import numpy as np

from sdserve.models.shapes import ATTRIBUTES, COLORS, full_spec, read_image, render, sample_scene, score
from sdserve.models.shapes.captions import ShapePrompt


def test_ground_truth_scenes_score_right():
    rng = np.random.default_rng(2024)
    counts = dict.fromkeys(ATTRIBUTES, 0)
    total = 300
    for _ in range(total):
        scene = sample_scene(rng)
        result = score(full_spec(scene), render(scene))
        for key in ATTRIBUTES:
            counts[key] += bool(result[key])
    for key in ATTRIBUTES:
        assert counts[key] / total >= 0.98, (key, counts[key])


def test_reading_reports_geometry():
    rng = np.random.default_rng(5)
    scene = sample_scene(rng, num_shapes=1)
    (found,) = read_image(render(scene)).shapes
    (truth,) = scene.shapes
    assert (found.color, found.kind, found.size, found.position) == (
        truth.color,
        truth.kind,
        truth.size,
        truth.position,
    )
    assert abs(found.box_center[0] - truth.cx) <= 1 and abs(found.box_center[1] - truth.cy) <= 1
    assert abs(found.extent - truth.extent) <= 1


def test_wrong_prompts_score_wrong():
    rng = np.random.default_rng(7)
    for _ in range(50):
        scene = sample_scene(rng, num_shapes=1)
        spec = full_spec(scene)
        (shape,) = spec.shapes
        other_color = next(c for c in COLORS if c not in (shape.color, scene.background))
        other_kind = {"circle": "square", "square": "triangle", "triangle": "circle"}[shape.kind]
        other_place = {"left": "right", "right": "left", "top": "bottom", "bottom": "center", "center": "top"}
        wrong = replace(
            spec,
            shapes=(
                ShapePrompt(
                    other_color,
                    other_kind,
                    "large" if shape.size == "small" else "small",
                    other_place[shape.position],
                ),
            ),
            background=other_color,
        )
        result = score(wrong, render(scene))
        assert not any(result[key] for key in ATTRIBUTES)


def test_blank_image_finds_nothing():
    image = np.full((64, 64, 3), 245, dtype=np.uint8)
    spec = full_spec(sample_scene(np.random.default_rng(0), num_shapes=2))
    assert read_image(image).shapes == ()
    assert score(spec, image)["color"] is False
