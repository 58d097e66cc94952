import numpy as np

from sdserve.models.shapes import HELD_OUT, PALETTE, POSITIONS, render, sample_scene
from sdserve.models.shapes.world import SIZE_RANGE, position_of, shape_mask, size_of


def _scenes(seed: int, count: int):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(count)]


def test_same_seed_same_scenes_and_pixels():
    first, second = _scenes(3, 50), _scenes(3, 50)
    assert first == second
    assert all(np.array_equal(render(a), render(b)) for a, b in zip(first, second))
    assert _scenes(4, 50) != first


def test_scene_invariants():
    for scene in _scenes(0, 400):
        assert 1 <= len(scene.shapes) <= 2
        image = render(scene)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        for shape in scene.shapes:
            assert shape.color != scene.background
            lo, hi = SIZE_RANGE[shape.size]
            assert lo <= shape.extent <= hi and size_of(shape.extent) == shape.size
            assert position_of(shape.cx, shape.cy) == shape.position
            mask = shape_mask(shape)
            assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()
            # Exact palette colours where the shape is (nothing drawn over it).
            assert (image[mask] == PALETTE[shape.color]).all()
        if len(scene.shapes) == 2:
            a, b = (shape_mask(s) for s in scene.shapes)
            assert not (a & b).any()
            assert scene.shapes[0].position != scene.shapes[1].position


def test_exclude_keeps_held_out_triples_out():
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(600):
        for shape in sample_scene(rng, exclude=HELD_OUT).shapes:
            seen.add((shape.color, shape.kind, shape.position))
    assert not seen & HELD_OUT
    assert len(seen) > 90  # nearly every other triple turns up
    assert {p for _, _, p in HELD_OUT} == set(POSITIONS)
