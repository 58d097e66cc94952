"""A request gives the same pixels alone or in a mixed batch (ARCHITECTURE rule 4)."""

from __future__ import annotations

import pytest

from sdserve.engine import Engine, EngineConfig, RequestSpec
from tests.engine.oracle import max_pixel_difference

TOLERANCE = 2

MIXED = [
    dict(prompt="a red circle", seed=1, steps=3, scheduler="euler", guidance_scale=7.5),
    dict(prompt="a blue square", seed=2, steps=4, scheduler="euler_a", guidance_scale=1.0),
    dict(prompt="a green triangle", seed=3, steps=2, scheduler="ddim", guidance_scale=3.0, width=48),
    dict(prompt="a cat", seed=4, steps=5, scheduler="dpmpp_2m", guidance_scale=7.5, num_images=2),
    dict(prompt="a dog", seed=5, steps=3, scheduler="unipc", guidance_scale=5.0, width=48),
    dict(prompt="a house", seed=6, steps=4, scheduler="lcm", guidance_scale=1.0),
    dict(prompt="a tree", seed=7, steps=3, scheduler="dpmpp_2m_karras", guidance_scale=9.0, width=48),
    dict(prompt="a car", seed=8, steps=2, scheduler="pndm", guidance_scale=7.5, negative_prompt="blurry"),
    dict(prompt="the sea", seed=9, steps=3, scheduler="heun", guidance_scale=2.0, width=48),
    dict(prompt="a city", seed=10, steps=4, scheduler="ddpm", guidance_scale=7.5, negative_prompt=""),
    dict(prompt="a red circle", seed=11, steps=3, scheduler="euler", guidance_scale=7.5, width=48),
    dict(prompt="a mountain", seed=12, steps=5, scheduler="euler_a", guidance_scale=6.0),
    dict(prompt="a sky", seed=13, steps=1, scheduler="euler", guidance_scale=7.5, width=48, num_images=2),
    # guidance intervals: these rows change from two per image to one (or back) mid-run
    dict(prompt="a boat", seed=14, steps=4, scheduler="euler", guidance_scale=7.5, guidance_end=0.5),
    dict(prompt="a bird", seed=15, steps=4, scheduler="ddim", guidance_scale=5.0, guidance_start=0.5, num_images=2),
]


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_mixed_batch_equals_alone(model):
    engine = Engine(EngineConfig(max_batch_rows=8))  # 31 rows at most: batches rotate
    requests = [engine.validate(RequestSpec(model=model, **fields)) for fields in MIXED]
    together = engine.generate(requests)
    for request, mixed in zip(requests, together):
        alone = engine.generate([request])[0]
        assert len(alone.images) == len(mixed.images) == request.num_images
        for a, b in zip(alone.images, mixed.images):
            assert max_pixel_difference(a, b) <= TOLERANCE, request


def test_batches_really_mix_requests():
    """The invariance test is only meaningful if different requests do share UNet calls."""
    engine = Engine(EngineConfig(max_batch_rows=8))
    requests = [engine.validate(RequestSpec(model="tiny-sd1", **fields)) for fields in MIXED]
    calls: list[tuple[int, set[str], set[tuple[int, int]]]] = []
    original = engine.runner.step

    def spy(model, batch):
        schedulers = {e.state.request.scheduler for e in batch.entries}
        sizes = {(e.state.request.width, e.state.request.height) for e in batch.entries}
        calls.append((batch.num_rows, schedulers, sizes))
        return original(model, batch)

    engine.runner.step = spy
    engine.generate(requests)
    assert any(len(schedulers) >= 3 for _, schedulers, _ in calls)
    assert all(rows <= 8 for rows, _, _ in calls)
    assert all(len(sizes) == 1 for _, _, sizes in calls)  # one latent size per UNet call
    assert len({next(iter(sizes)) for _, _, sizes in calls}) == 2  # both size groups ran
