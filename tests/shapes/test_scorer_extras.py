"""The scorer reads stars, teal and outlined shapes from ground truth, and the base world as before."""

import itertools
from collections import Counter

import numpy as np
import pytest

from sdserve.models.shapes import ATTRIBUTES, PromptSpec, ShapePrompt, read_image, render, sample_scene, score
from sdserve.models.shapes.world import (
    ALL_COLORS,
    ALL_KINDS,
    COLORS,
    FULL_PALETTE,
    POSITIONS,
    SIZES,
    STYLES,
    SceneSpec,
    ShapeSpec,
    shape_mask,
)

SCORED = (*ATTRIBUTES, "style", "count")


def _truth(scene: SceneSpec) -> PromptSpec:
    """Every attribute, the style included even when filled (captions leave "filled" unsaid)."""
    return PromptSpec(
        tuple(ShapePrompt(s.color, s.kind, s.size, s.position, s.style) for s in scene.shapes), scene.background
    )


def _all_right(scene: SceneSpec) -> bool:
    result = score(_truth(scene), render(scene))
    return all(result[key] for key in SCORED)


def test_every_extra_combination_reads_back_in_single_shape_scenes():
    """All kinds x {teal, a base colour} x styles x sizes x positions, three placements each."""
    right, total = Counter(), Counter()
    rng = np.random.default_rng(31)
    for kind, teal, style, size, position in itertools.product(ALL_KINDS, (True, False), STYLES, SIZES, POSITIONS):
        for _ in range(3):
            color = "teal" if teal else COLORS[rng.integers(len(COLORS))]
            scene = sample_scene(
                rng,
                num_shapes=1,
                kinds=(kind,),
                colors=(color,),
                backgrounds=ALL_COLORS,
                positions=(position,),
                sizes=(size,),
                styles=(style,),
            )
            ok = _all_right(scene)
            for group, member in (("star", kind == "star"), ("teal", teal), ("outlined", style == "outlined"),
                                  ("star+teal+outlined", kind == "star" and teal and style == "outlined"),
                                  ("all", True)):
                if member:
                    total[group] += 1
                    right[group] += ok
    accuracy = {group: right[group] / total[group] for group in total}
    assert total["star+teal+outlined"] == 30
    assert all(value >= 0.98 for value in accuracy.values()), accuracy


def test_two_shape_scenes_with_extras_read_back():
    rng = np.random.default_rng(32)
    right, total = Counter(), Counter()
    for _ in range(400):
        scene = sample_scene(rng, num_shapes=2, kinds=ALL_KINDS, colors=ALL_COLORS, backgrounds=ALL_COLORS,
                             styles=STYLES)
        ok = _all_right(scene)
        groups = {"all"} | {s.kind for s in scene.shapes} | {s.color for s in scene.shapes if s.color == "teal"}
        groups |= {s.style for s in scene.shapes}
        for group in groups:
            total[group] += 1
            right[group] += ok
    accuracy = {group: right[group] / total[group] for group in total}
    assert {"star", "teal", "outlined"} <= set(accuracy)
    assert all(value >= 0.98 for value in accuracy.values()), accuracy


def test_base_world_reads_back_exactly_and_filled():
    """The base attributes stay at 100 % on ground truth; no base shape reads as outlined or star."""
    rng = np.random.default_rng(2024)
    for _ in range(300):
        scene = sample_scene(rng)
        reading = read_image(render(scene))
        assert all(found.style == "filled" and found.kind != "star" for found in reading.shapes)
        assert _all_right(scene), scene


def test_fill_and_footprint_of_outlined_shapes():
    for kind, size, extent in (("circle", "large", 28), ("square", "small", 14), ("triangle", "large", 30)):
        filled = ShapeSpec(kind, "red", size, "center", extent, 32.2, 31.6)
        outlined = ShapeSpec(kind, "red", size, "center", extent, 32.2, 31.6, "outlined")
        (solid,) = read_image(render(SceneSpec("white", (filled,)))).shapes
        (ring,) = read_image(render(SceneSpec("white", (outlined,)))).shapes
        assert (solid.style, ring.style) == ("filled", "outlined")
        assert ring.kind == solid.kind == kind
        assert ring.area == shape_mask(outlined).sum() and solid.area == shape_mask(filled).sum()
        assert ring.footprint == solid.footprint == solid.area  # ring + its hole = the filled shape
        assert ring.fill == pytest.approx(solid.fill * ring.area / solid.area)
        assert ring.fill < 0.75 * solid.fill


def test_style_is_scored_only_when_named():
    scene = SceneSpec("black", (ShapeSpec("star", "teal", "large", "left", 28, 16.0, 32.0, "outlined"),))
    image = render(scene)
    silent = score(PromptSpec((ShapePrompt("teal", "star", "large", "left"),), "black"), image)
    assert silent["style"] is None and silent["all"]
    wrong = score(PromptSpec((ShapePrompt("teal", "star", style="filled"),)), image)
    assert wrong["style"] is False and not wrong["all"] and wrong["shape"] and wrong["color"]
    missing = score(PromptSpec((ShapePrompt("teal", "star"), ShapePrompt("red", "circle", style="outlined"))), image)
    assert missing["style"] is False


def test_halo_ring_around_a_shape_is_not_an_outlined_shape():
    """A 1 px ring of in-between colour around a shape (what a model paints) encloses the shape's
    colour, not background: it must stay a dropped sliver, as before the style existed."""
    image = np.empty((64, 64, 3), dtype=np.uint8)
    image[:] = FULL_PALETTE["yellow"]
    image[19:45, 19:45] = FULL_PALETTE["orange"]  # the halo
    image[20:44, 20:44] = FULL_PALETTE["red"]
    (found,) = read_image(image).shapes
    assert (found.color, found.kind, found.style, found.extent) == ("red", "square", "filled", 24)


def test_green_blue_blends_do_not_turn_teal():
    """A green square on blue with a blended 1 px edge: the edge is nearer teal than either
    colour, but it is no teal shape and must not eat the square's corners."""
    green, blue = np.array(FULL_PALETTE["green"]), np.array(FULL_PALETTE["blue"])
    image = np.empty((64, 64, 3), dtype=np.uint8)
    image[:] = blue
    image[15:49, 15:49] = ((green + blue) / 2).round()  # (30, 122, 138): 53 from teal, 106 from both
    image[16:48, 16:48] = green
    reading = read_image(image)
    assert reading.background == "blue"
    assert [(s.color, s.kind) for s in reading.shapes] == [("green", "square")]
    teal = np.array(FULL_PALETTE["teal"])
    image[20:44, 20:44] = (teal + np.array([12, -15, 10])).clip(0, 255)  # an off-palette teal centre
    assert {s.color for s in read_image(image).shapes} == {"green", "teal"}
