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
    inputs = dict(prompt=request.prompt, negative_prompt=request.negative_prompt, guidance_scale=request.guidance_scale)
    if request.guidance and (request.guidance_start, request.guidance_end) != (0.0, 1.0):
        inputs = _guidance_interval_inputs(pipe, request)
    try:
        images = pipe(
            **inputs,
            num_inference_steps=request.steps,
            width=request.width,
            height=request.height,
            num_images_per_prompt=request.num_images,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="np",
        ).images
    finally:
        pipe.scheduler = original
    return (images * 255).round().astype(np.uint8)


def _guidance_interval_inputs(pipe, request: EngineRequest) -> dict:
    """A guidance interval the way diffusers' docs switch guidance mid-run ("dynamic
    classifier-free guidance"): a step-end callback sets the pipeline's guidance scale and hands
    the loop the embeddings of the rows the next step runs. Both prompts are encoded up front
    with diffusers' own `encode_prompt`, so the first step may run with or without guidance.
    Stable Diffusion 1.x/2.x pipelines only (their loop reads just `prompt_embeds`)."""
    if "xl" in request.model:
        raise NotImplementedError("the guidance-interval oracle covers SD 1.x/2.x pipelines")
    cond, uncond = pipe.encode_prompt(
        request.prompt, pipe.device, 1, True, request.negative_prompt or ""
    )  # [1, seq, dim] each; the pipeline repeats them per image
    n = request.num_images
    cond, uncond = cond.repeat(n, 1, 1), uncond.repeat(n, 1, 1)
    # N of the activity rule: UNet evaluations, as the callback counts them (Heun runs 2N - 1,
    # PLMS N + 1); the pipeline sets the same timesteps on the same scheduler again.
    pipe.scheduler.set_timesteps(request.steps)
    num_steps = len(pipe.scheduler.timesteps)

    def guided(step: int) -> bool:
        return request.guidance_start <= step / num_steps and (step + 1) / num_steps <= request.guidance_end

    def on_step_end(pipe, step, timestep, tensors):
        if step + 1 >= num_steps or guided(step + 1) == guided(step):
            return {}
        pipe._guidance_scale = request.guidance_scale if guided(step + 1) else 1.0
        return {"prompt_embeds": torch.cat([uncond, cond]) if guided(step + 1) else cond}

    first = guided(0)
    return dict(
        prompt_embeds=cond[:1],
        negative_prompt_embeds=uncond[:1] if first else None,
        guidance_scale=request.guidance_scale if first else 1.0,
        callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )


def max_pixel_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def generate_together_and_alone(engine, requests: list) -> tuple[list, list[int], list[int]]:
    """Run `requests` in one `engine.generate` call, then each alone: (the results together, the
    number of different LoRA stacks in each UNet call of the batch, max pixel difference of each
    request's image together vs alone). The caller asserts on both lists."""
    from sdserve.errors import SdserveError

    calls: list[int] = []
    original = engine.runner.step

    def spy(model, batch):
        calls.append(len({tuple(map(tuple, stack)) for stack in batch.rows.lora}))
        return original(model, batch)

    engine.runner.step = spy
    try:
        together = engine.generate(requests)
    finally:
        engine.runner.step = original
    differences = []
    for request, mixed in zip(requests, together, strict=True):
        assert not isinstance(mixed, SdserveError), (request.adapters, mixed)
        alone = engine.generate([request])[0]
        differences.append(max_pixel_difference(alone.images[0], mixed.images[0]))
    return together, calls, differences
