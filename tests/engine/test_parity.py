"""Parity with diffusers: same model, inputs, seed and scheduler give the same pixels (≤ 2/255).

A covering set rather than the full grid: every scheduler, every family, the negative prompt
absent / "" / text, guidance 1.0 and > 1, square and non-square, more than one image.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.schedulers import ALIASES
from tests.engine.oracle import diffusers_images, max_pixel_difference

TOLERANCE = 2  # of 255

CASES = [
    # model, scheduler, negative_prompt, guidance, width, height, num_images
    ("tiny-sd1", "euler", None, 7.5, 32, 32, 1),
    ("tiny-sd1", "euler_a", "blurry", 7.5, 32, 48, 2),
    ("tiny-sd1", "ddim", "", 1.0, 48, 32, 1),
    ("tiny-sd2", "dpmpp_2m", None, 7.5, 32, 32, 1),
    ("tiny-sd2", "dpmpp_2m_karras", "blurry", 5.0, 40, 32, 1),
    ("tiny-sd2", "unipc", "", 1.0, 32, 32, 2),
    ("tiny-sdxl", "euler", None, 5.0, 32, 32, 1),  # absent: zero negative embeddings
    ("tiny-sdxl", "lcm", "", 5.0, 32, 48, 1),  # "": the empty string encoded
    ("tiny-sdxl", "euler_a", "ugly", 1.0, 48, 32, 2),
    ("tiny-sdxl", "DPMSolverMultistepScheduler", "bad quality", 3.0, 32, 32, 1),
    ("default", "dpmpp_2m", None, 7.5, 64, 64, 1),
    ("default", "pndm", "blurry", 7.5, 64, 48, 1),
    ("default", "heun", "", 1.0, 48, 64, 1),
    ("default", "ddpm", None, 4.0, 64, 64, 1),
    # A1111's samplers beyond the above (issue 23 item 8)
    ("tiny-sd1", "euler_karras", "blurry", 7.5, 32, 32, 1),
    ("tiny-sd1", "dpm2", "", 7.5, 32, 32, 1),
    ("tiny-sd1", "dpm2_a", None, 7.5, 32, 32, 2),
    ("tiny-sd2", "dpmpp_2m_sde", "blurry", 7.5, 32, 32, 2),
    ("tiny-sd1", "dpmpp_2m_sde_karras", None, 5.0, 32, 32, 1),
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig())


def test_cases_cover_every_scheduler_family_and_negative_prompt_form():
    covered = {c[1] for c in CASES}
    assert set(ALIASES) <= covered | {"EulerDiscreteScheduler"}, set(ALIASES) - covered
    assert {c[0] for c in CASES} == {"tiny-sd1", "tiny-sd2", "tiny-sdxl", "default"}
    for model in ("tiny-sd1", "tiny-sdxl"):
        assert {type(c[2]) for c in CASES if c[0] == model} >= {str}
    assert any(c[2] is None for c in CASES) and any(c[2] == "" for c in CASES)
    assert any(c[3] == 1.0 for c in CASES) and any(c[4] != c[5] for c in CASES)


@pytest.mark.parametrize("model,scheduler,negative,guidance,width,height,num_images", CASES)
def test_pixels_match_diffusers(engine, model, scheduler, negative, guidance, width, height, num_images):
    spec = RequestSpec(
        model=model,
        prompt="a red circle on the left",
        negative_prompt=negative,
        seed=1234,
        steps=3,
        guidance_scale=guidance,
        scheduler=scheduler,
        width=width,
        height=height,
        num_images=num_images,
    )
    request = engine.validate(spec)
    result = engine.generate([request])[0]
    ours = np.stack(result.images)
    theirs = diffusers_images(request)
    assert max_pixel_difference(ours, theirs) <= TOLERANCE
    # The oracle must be able to fail: a different seed gives a different image.
    assert ours.std() > 0


def test_sdxl_absent_and_empty_negative_prompt_differ(engine):
    base = dict(model="tiny-sdxl", prompt="a cat", seed=5, steps=2, guidance_scale=5.0)
    absent = engine.generate([engine.validate(RequestSpec(**base))])[0].images[0]
    empty = engine.generate([engine.validate(RequestSpec(**base, negative_prompt=""))])[0].images[0]
    assert max_pixel_difference(absent, empty) > TOLERANCE


def test_different_seed_changes_the_image(engine):
    a = engine.generate([engine.validate(RequestSpec(model="tiny-sd1", prompt="a cat", seed=1, steps=2))])[0]
    b = engine.generate([engine.validate(RequestSpec(model="tiny-sd1", prompt="a cat", seed=2, steps=2))])[0]
    assert max_pixel_difference(a.images[0], b.images[0]) > TOLERANCE


@pytest.mark.parametrize(
    "model,start,end,num_images",
    [("default", 0.0, 0.5, 1), ("default", 0.25, 0.75, 2), ("tiny-sd2", 0.0, 0.25, 1)],
)
def test_guidance_interval_matches_diffusers_dynamic_guidance(engine, model, start, end, num_images):
    """Guidance only inside [guidance_start, guidance_end] equals diffusers switching guidance
    on and off from a step-end callback; and it is not the fully guided image."""
    fields = dict(model=model, prompt="a small red square at the top", seed=3, steps=4, guidance_scale=7.5,
                  scheduler="euler", num_images=num_images)
    request = engine.validate(RequestSpec(**fields, guidance_start=start, guidance_end=end))
    ours = np.stack(engine.generate([request])[0].images)
    assert max_pixel_difference(ours, diffusers_images(request)) <= TOLERANCE
    everywhere = np.stack(engine.generate([engine.validate(RequestSpec(**fields))])[0].images)
    assert max_pixel_difference(ours, everywhere) > TOLERANCE


def test_steps_outside_the_guidance_interval_run_one_row_per_image(engine):
    calls: list[int] = []
    original = engine.runner.step

    def spy(model, batch):
        calls.append(batch.num_rows)
        return original(model, batch)

    engine.runner.step = spy
    try:
        engine.generate([engine.validate(RequestSpec(
            model="tiny-sd1", prompt="a cat", seed=1, steps=4, guidance_scale=5.0, num_images=2, guidance_end=0.5
        ))])
    finally:
        engine.runner.step = original
    assert calls == [4, 4, 2, 2]
