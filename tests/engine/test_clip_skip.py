"""clip_skip in A1111's meaning (diffusers' clip_skip + 1): parity with diffusers' pipelines,
mixed batches, the default path unchanged, and the range refused with the field named.

diffusers' SD pipeline applies its clip_skip to the prompt only (the negative prompt is always
read from the last layer); sdserve applies it to both, as A1111 does. The guided case therefore
hands diffusers both prompts encoded by its own `encode_prompt(clip_skip=...)`.
"""

from __future__ import annotations

from contextlib import contextmanager

import diffusers
import numpy as np
import pytest
import torch

from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.families import family_of
from sdserve.engine.request import max_clip_skip
from sdserve.engine.schedulers import resolve_scheduler
from sdserve.errors import InvalidArgument
from tests.engine.oracle import max_pixel_difference, pipeline

BASE = dict(prompt="a red circle on the left", seed=11, steps=3, width=32, height=32)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig())


@contextmanager
def _text_model_path(encoder):
    """diffusers 0.42's SD pipeline reads `text_encoder.text_model.final_layer_norm`, a path
    transformers 5 flattened away (the norm is `text_encoder.final_layer_norm`). For the length of
    one call, the pipeline's own encoder instance answers that path (an instance attribute, not a
    registered submodule: nothing else about the module changes)."""
    added = not hasattr(encoder, "text_model")
    if added:
        object.__setattr__(encoder, "text_model", encoder)
    try:
        yield
    finally:
        if added:
            encoder.__dict__.pop("text_model", None)


def _diffusers(model: str, request, **inputs) -> np.ndarray:
    pipe = pipeline(model)
    original = pipe.scheduler
    choice = resolve_scheduler(request.scheduler)
    pipe.scheduler = getattr(diffusers, choice.class_name).from_config(original.config, **choice.overrides)
    try:
        with _text_model_path(pipe.text_encoder):
            images = pipe(**inputs, guidance_scale=request.guidance_scale, num_inference_steps=request.steps,
                          width=request.width, height=request.height,
                          generator=torch.Generator("cpu").manual_seed(request.seed), output_type="np").images
    finally:
        pipe.scheduler = original
    return (images * 255).round().astype(np.uint8)


@pytest.mark.parametrize("model,clip_skip", [("tiny-sd1", 2), ("tiny-sd1", 4), ("tiny-sdxl", 2)])
def test_unguided_matches_diffusers_clip_skip(engine, model, clip_skip):
    request = engine.validate(RequestSpec(model=model, guidance_scale=1.0, clip_skip=clip_skip, **BASE))
    ours = np.stack(engine.generate([request])[0].images)
    theirs = _diffusers(model, request, prompt=request.prompt, clip_skip=clip_skip - 1)
    assert max_pixel_difference(ours, theirs) <= 2
    default = _diffusers(model, request, prompt=request.prompt)
    assert max_pixel_difference(theirs, default) > 2  # the oracle can fail: the layer matters


def test_guided_matches_diffusers_with_both_prompts_skipped(engine):
    request = engine.validate(RequestSpec(model="tiny-sd1", guidance_scale=7.5, negative_prompt="blurry",
                                          clip_skip=3, **BASE))
    ours = np.stack(engine.generate([request])[0].images)
    pipe = pipeline("tiny-sd1")
    with torch.no_grad(), _text_model_path(pipe.text_encoder):
        cond, _ = pipe.encode_prompt(request.prompt, "cpu", 1, False, clip_skip=2)  # [1, 77, dim]
        uncond, _ = pipe.encode_prompt("blurry", "cpu", 1, False, clip_skip=2)
    theirs = _diffusers("tiny-sd1", request, prompt_embeds=cond, negative_prompt_embeds=uncond)
    assert max_pixel_difference(ours, theirs) <= 2


def test_mixed_clip_skips_in_one_batch_equal_each_alone(engine):
    specs = [RequestSpec(model="tiny-sd1", guidance_scale=7.5, clip_skip=k, **{**BASE, "seed": 20 + k})
             for k in (1, 2, 3)] + [RequestSpec(model="tiny-sd1", guidance_scale=7.5, clip_skip=2,
                                                prompt_syntax="a1111", **{**BASE, "prompt": "a (red:1.4) circle"})]
    together = engine.generate([engine.validate(spec) for spec in specs])
    for spec, result in zip(specs, together):
        alone = engine.generate([engine.validate(spec)])[0]
        assert max_pixel_difference(np.stack(result.images), np.stack(alone.images)) <= 2


def test_absent_clip_skip_and_syntax_keep_todays_bytes(engine):
    absent = engine.validate(RequestSpec(model="tiny-sd1", guidance_scale=7.5, negative_prompt="x", **BASE))
    explicit = engine.validate(RequestSpec(model="tiny-sd1", guidance_scale=7.5, negative_prompt="x",
                                           clip_skip=1, prompt_syntax="plain", **BASE))
    a, b = engine.generate([absent]), engine.generate([explicit])
    assert np.array_equal(np.stack(a[0].images), np.stack(b[0].images))
    # Plain conditioning is diffusers' encode_prompt, bit for bit, as before these fields existed.
    model = engine.models.get("tiny-sd1")
    with torch.inference_mode():
        ours = family_of("sd1").encode(model, BASE["prompt"], "x", True, 1, 32, 32).encoder_hidden_states
        cond, uncond = pipeline("tiny-sd1").encode_prompt(BASE["prompt"], "cpu", 1, True, "x")
    assert torch.equal(ours, torch.cat([uncond, cond]))


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_out_of_range_clip_skip_is_refused_naming_the_field(engine, model):
    deepest = max_clip_skip(engine.models.info(model))
    layers = min(engine.models.info(model).text_layers.values())
    assert deepest == (layers - 1 if model == "tiny-sdxl" else layers)
    engine.validate(RequestSpec(model=model, prompt="x", clip_skip=deepest))
    for bad in (0, -1, deepest + 1):
        with pytest.raises(InvalidArgument) as caught:
            engine.validate(RequestSpec(model=model, prompt="x", clip_skip=bad))
        assert caught.value.field == "clip_skip"
