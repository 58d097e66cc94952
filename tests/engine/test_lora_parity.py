"""LoRA stacks through sdserve give diffusers + PEFT's pixels (load_lora_weights + set_adapters).

A covering set: every family, diffusers and kohya layouts (SDXL's original block names too),
UNet and text-encoder keys, ranks 1 to 64 mixed, alpha != rank, negative scales, conv layers,
and start/end ranges matched by changing set_adapters weights in callback_on_step_end.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.activity import active_at
from sdserve.engine.request import AdapterSpec
from tests.engine.lora_cases import UNET_ATTENTION, UNET_CONV, write_model_lora
from tests.engine.oracle import max_pixel_difference, pipeline

TOLERANCE = 2

# model -> list of (name, rank, alpha, unet targets, text encoder?, layout, scale, start, end)
CASES = {
    "sd1-one-peft-te": (
        "tiny-sd1",
        [("a", 4, 8.0, UNET_ATTENTION, True, "peft", 0.8, 0.0, 1.0)],
    ),
    "sd1-two-kohya-conv-negative": (
        "tiny-sd1",
        [
            ("a", 8, 4.0, UNET_ATTENTION + UNET_CONV, False, "peft", 1.0, 0.0, 1.0),
            ("b", 2, 3.0, UNET_ATTENTION, True, "kohya", -0.7, 0.0, 1.0),
        ],
    ),
    "sd2-three-ranks-1-16-64": (
        "tiny-sd2",
        [
            ("a", 1, 1.0, UNET_ATTENTION, False, "peft", 1.0, 0.0, 1.0),
            ("b", 16, 8.0, UNET_CONV, True, "kohya", 0.5, 0.0, 1.0),
            ("c", 64, 32.0, ["to_q", "to_v"], False, "peft", -1.2, 0.0, 1.0),
        ],
    ),
    "sdxl-sgm-and-peft-te2": (
        "tiny-sdxl",
        [
            ("a", 4, 2.0, UNET_ATTENTION, True, "kohya_sgm", 0.9, 0.0, 1.0),
            ("b", 8, 8.0, UNET_ATTENTION + ["conv1", "conv2"], True, "peft", -0.5, 0.0, 1.0),
        ],
    ),
    "sd1-start-end": (
        "tiny-sd1",
        [
            ("a", 4, 8.0, UNET_ATTENTION, True, "peft", 1.0, 0.5, 1.0),  # a late Concept Slider
            ("b", 4, 4.0, UNET_ATTENTION + UNET_CONV, False, "peft", 1.3, 0.0, 0.5),
        ],
    ),
}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig())


def _diffusers_with_stack(model, request, paths, stack):
    pipe = pipeline(model)
    names = []
    for index, (path, entry) in enumerate(zip(paths, stack)):
        name = f"{entry[0]}{index}"
        pipe.load_lora_weights(str(path), adapter_name=name)
        names.append(name)
    scales = [entry[6] for entry in stack]
    ranges = [(entry[7], entry[8]) for entry in stack]

    def weights_at(step, num_steps):
        return [s if active_at(step, num_steps, a, b) else 0.0 for s, (a, b) in zip(scales, ranges)]

    def on_step_end(pipe_, i, t, kwargs):
        num_steps = len(pipe_.scheduler.timesteps)
        if i + 1 < num_steps:
            pipe_.set_adapters(names, weights_at(i + 1, num_steps))
        return {}

    import torch

    from sdserve.engine.schedulers import make_scheduler, resolve_scheduler

    original = pipe.scheduler
    pipe.scheduler = make_scheduler(resolve_scheduler(request.scheduler), dict(original.config))
    pipe.scheduler.set_timesteps(request.steps)
    pipe.set_adapters(names, weights_at(0, len(pipe.scheduler.timesteps)))
    try:
        images = pipe(
            request.prompt,
            negative_prompt=request.negative_prompt,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            width=request.width,
            height=request.height,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            callback_on_step_end=on_step_end,
            output_type="np",
        ).images
    finally:
        pipe.unload_lora_weights()
        pipe.scheduler = original
    return (images * 255).round().astype(np.uint8)


@pytest.mark.parametrize("case", list(CASES))
def test_lora_stack_matches_diffusers(engine, tmp_path, case):
    model, stack = CASES[case]
    paths = [
        write_model_lora(model, tmp_path, name, rank=rank, alpha=alpha, unet_targets=targets,
                         text_encoder=te, layout=layout, seed=index)
        for index, (name, rank, alpha, targets, te, layout, *_rest) in enumerate(stack)
    ]
    adapters = tuple(
        AdapterSpec(path=str(p), scale=e[6], start=e[7], end=e[8]) for p, e in zip(paths, stack)
    )
    spec = RequestSpec(model=model, prompt="a red circle", negative_prompt="blurry", seed=42, steps=4,
                       guidance_scale=6.0, scheduler="euler", adapters=adapters)
    request = engine.validate(spec)
    ours = np.stack(engine.generate([request])[0].images)
    theirs = _diffusers_with_stack(model, request, paths, stack)
    assert max_pixel_difference(ours, theirs) <= TOLERANCE
    # The adapters must matter, or this test proves nothing.
    plain = engine.generate([engine.validate(RequestSpec(**{**spec.__dict__, "adapters": ()}))])[0]
    assert max_pixel_difference(ours, np.stack(plain.images)) > 10
