"""Every invalid field is a typed error that names the field and the rule."""

from __future__ import annotations

import pytest

from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.errors import InvalidArgument, NotFound


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(max_batch_rows=12))


GOOD = dict(model="tiny-sd1", prompt="a cat")


@pytest.mark.parametrize(
    "change,field,words",
    [
        (dict(steps=0), "steps", "between 1 and"),
        (dict(steps=-3), "steps", "between 1 and"),
        (dict(steps=251), "steps", "between 1 and 250"),
        (dict(steps=51, scheduler="lcm"), "steps", "for scheduler lcm"),
        (dict(width=33), "width", "multiple of 8"),
        (dict(height=12), "height", "multiple of 8"),
        (dict(width=512), "width", "between 8 and 256"),
        (dict(height=0), "height", "between 8 and 256"),
        (dict(scheduler="karras_magic"), "scheduler", "unknown scheduler"),
        (dict(guidance_scale=-1.0), "guidance_scale", "between 0 and"),
        (dict(guidance_scale=float("nan")), "guidance_scale", "between 0 and"),
        (dict(num_images=0), "num_images", "between 1 and 8"),
        (dict(num_images=9), "num_images", "between 1 and 8"),
        (dict(num_images=8, guidance_scale=7.5), "num_images", "UNet rows"),
        (dict(prompt=""), "prompt", "must not be empty"),
        (dict(prompt="   "), "prompt", "must not be empty"),
        (dict(seed=-1), "seed", "between 0 and"),
        (dict(guidance_start=-0.1), "guidance_start", "between 0 and 1"),
        (dict(guidance_start=float("nan")), "guidance_start", "between 0 and 1"),
        (dict(guidance_end=1.5), "guidance_end", "between guidance_start (0) and 1"),
        (dict(guidance_start=0.6, guidance_end=0.4), "guidance_end", "between guidance_start (0.6) and 1"),
    ],
)
def test_invalid_field_is_named(engine, change, field, words):
    with pytest.raises(InvalidArgument) as info:
        engine.validate(RequestSpec(**{**GOOD, **change}))
    assert info.value.field == field
    assert words in str(info.value)
    assert str(info.value).startswith(f"{field}: ")


def test_unknown_model_is_not_found_and_does_not_echo_paths(engine):
    with pytest.raises(NotFound) as info:
        engine.validate(RequestSpec(model="/etc/secret-model", prompt="x"))
    assert info.value.field == "model"
    assert "/etc" not in str(info.value)


def test_defaults_fill_absent_fields(engine):
    request = engine.validate(RequestSpec(model="tiny-sdxl", prompt="a cat"))
    assert (request.width, request.height, request.steps) == (32, 32, 4)
    assert request.guidance_scale == 5.0 and request.scheduler == "euler"
    assert request.negative_prompt is None and 0 <= request.seed < 2**32
    assert (request.guidance_start, request.guidance_end) == (0.0, 1.0)  # guidance at every step


def test_guidance_one_uses_one_row_per_image(engine):
    assert engine.validate(RequestSpec(**GOOD, guidance_scale=1.0, num_images=3)).rows == 3
    assert engine.validate(RequestSpec(**GOOD, guidance_scale=1.5, num_images=3)).rows == 6
