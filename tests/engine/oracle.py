"""The oracle: stock diffusers pipelines loaded from the same directory, with the same inputs."""

from __future__ import annotations

from functools import cache

import diffusers
import numpy as np
import torch

from sdserve.engine.request import EngineRequest
from sdserve.engine.schedulers import resolve_scheduler
from sdserve.models.builtin import builtin_path


@cache
def pipeline(model: str):
    path = builtin_path(model)
    if "xl" in model:
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(request: EngineRequest) -> np.ndarray:
    """uint8 [num_images, H, W, 3], converted to 8 bits the way diffusers does."""
    pipe = pipeline(request.model)
    choice = resolve_scheduler(request.scheduler)
    original = pipe.scheduler  # the cached pipeline is shared by tests: put it back as it was
    pipe.scheduler = getattr(diffusers, choice.class_name).from_config(original.config, **choice.overrides)
    try:
        images = pipe(
            request.prompt,
            negative_prompt=request.negative_prompt,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            width=request.width,
            height=request.height,
            num_images_per_prompt=request.num_images,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="np",
        ).images
    finally:
        pipe.scheduler = original
    return (images * 255).round().astype(np.uint8)


def max_pixel_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
