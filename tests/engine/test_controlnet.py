"""ControlNet units per request match diffusers' ControlNet pipelines and mix freely in a batch."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.controlnet import ControlSpec
from sdserve.engine.schedulers import make_scheduler, resolve_scheduler
from sdserve.errors import InvalidArgument
from sdserve.models.builtin import builtin_path
from tests.engine.oracle import max_pixel_difference
from tests.engine.test_image_inputs import png, scene

TOLERANCE = 2


def make_controlnet(model: str, directory, seed: int):
    """ControlNetModel.from_unet with non-zero zero-convs, so every residual matters."""
    unet = UNet2DConditionModel.from_pretrained(builtin_path(model), subfolder="unet")
    # Tiny models downsample 2x in the VAE; the conditioning embedding must match (as in diffusers tests).
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.3)
    path = directory / f"controlnet-{model}-{seed}"
    net.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    directory = tmp_path_factory.mktemp("controlnets")
    return {
        "sd1-a": make_controlnet("tiny-sd1", directory, 1),
        "sd1-b": make_controlnet("tiny-sd1", directory, 2),
        "sdxl": make_controlnet("tiny-sdxl", directory, 3),
    }


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig())


def _diffusers(model, request, paths, units):
    nets = [ControlNetModel.from_pretrained(p) for p in paths]
    cls = diffusers.StableDiffusionXLControlNetPipeline if "xl" in model else diffusers.StableDiffusionControlNetPipeline
    kwargs = {"add_watermarker": False} if "xl" in model else {}
    pipe = cls.from_pretrained(builtin_path(model), controlnet=nets if len(nets) > 1 else nets[0], **kwargs)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(resolve_scheduler(request.scheduler), dict(pipe.scheduler.config))
    single = len(units) == 1
    images = [u.image for u in request.controlnets]
    out = pipe(
        request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale, width=request.width, height=request.height,
        num_images_per_prompt=request.num_images, generator=torch.Generator("cpu").manual_seed(request.seed),
        image=images[0] if single else images,
        controlnet_conditioning_scale=units[0][1] if single else [u[1] for u in units],
        control_guidance_start=units[0][2] if single else [u[2] for u in units],
        control_guidance_end=units[0][3] if single else [u[3] for u in units],
        output_type="np",
    ).images
    return (out * 255).round().astype(np.uint8)


CASES = {
    "sd1-one-unit": ("tiny-sd1", [("sd1-a", 0.8, 0.0, 1.0)], 1),
    "sd1-two-units-start-end": ("tiny-sd1", [("sd1-a", 1.0, 0.0, 0.5), ("sd1-b", 0.6, 0.25, 1.0)], 2),
    "sdxl-one-unit": ("tiny-sdxl", [("sdxl", 1.2, 0.0, 1.0)], 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_controlnet_matches_diffusers(engine, nets, case):
    model, units, num_images = CASES[case]
    controls = tuple(
        ControlSpec(model=str(nets[name]), image=png(scene(32, 32, seed=i)), scale=s, start=a, end=b)
        for i, (name, s, a, b) in enumerate(units)
    )
    spec = RequestSpec(model=model, prompt="a red circle", seed=5, steps=4, guidance_scale=6.0,
                       num_images=num_images, controlnets=controls)
    request = engine.validate(spec)
    ours = np.stack(engine.generate([request])[0].images)
    theirs = _diffusers(model, request, [nets[u[0]] for u in units], units)
    assert max_pixel_difference(ours, theirs) <= TOLERANCE
    plain = np.stack(engine.generate([engine.validate(RequestSpec(**{**spec.__dict__, "controlnets": ()}))])[0].images)
    assert max_pixel_difference(ours, plain) > 10  # the units matter


def test_controlnet_rows_mix_with_plain_rows(engine, nets):
    image = png(scene(seed=4))
    specs = [
        RequestSpec(model="tiny-sd1", prompt="a cat", seed=1, steps=3),
        RequestSpec(model="tiny-sd1", prompt="a dog", seed=2, steps=4,
                    controlnets=(ControlSpec(model=str(nets["sd1-a"]), image=image),)),
        RequestSpec(model="tiny-sd1", prompt="a cow", seed=3, steps=3, guidance_scale=1.0,
                    controlnets=(ControlSpec(model=str(nets["sd1-b"]), image=image, scale=0.5),
                                 ControlSpec(model=str(nets["sd1-a"]), image=image, start=0.5))),
        RequestSpec(model="tiny-sd1", prompt="a tree", seed=4, steps=4,
                    controlnets=(ControlSpec(model=str(nets["sd1-a"]), image=image, preprocess="canny"),)),
    ]
    requests = [engine.validate(s) for s in specs]
    together = engine.generate(requests)
    for request, mixed in zip(requests, together):
        assert max_pixel_difference(engine.generate([request])[0].images[0], mixed.images[0]) <= TOLERANCE


def test_controlnet_for_another_family_is_refused(engine, nets):
    spec = RequestSpec(model="tiny-sd1", prompt="x", controlnets=(ControlSpec(model=str(nets["sdxl"]), image=b"x"),))
    with pytest.raises(InvalidArgument) as info:
        engine.validate(spec)
    assert info.value.field == "controlnets[0].model" and "another base model" in str(info.value)


def test_controlnet_whose_conditioning_stride_is_not_the_vae_scale_is_refused_with_the_reason(engine, tmp_path):
    # diffusers' default conditioning embedding downsamples 8x; tiny-sd1's VAE 2x. Before this was
    # checked, the request validated and every one failed INTERNAL inside the UNet call.
    unet = UNet2DConditionModel.from_pretrained(builtin_path("tiny-sd1"), subfolder="unet")
    ControlNetModel.from_unet(unet).save_pretrained(tmp_path / "stride8")
    spec = RequestSpec(model="tiny-sd1", prompt="x", controlnets=(ControlSpec(model=str(tmp_path / "stride8"), image=b"x"),))
    with pytest.raises(InvalidArgument) as info:
        engine.validate(spec)
    assert info.value.field == "controlnets[0].model"
    assert "down 8x but the base model's VAE scale is 2x" in str(info.value)
