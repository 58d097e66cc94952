"""IP-Adapter per request matches diffusers' load_ip_adapter + set_ip_adapter_scale, and rows of
requests without one get no image branch."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.ip_adapter import IPAdapterSpec
from sdserve.engine.schedulers import make_scheduler, resolve_scheduler
from sdserve.models.builtin import builtin_path
from tests.engine.oracle import max_pixel_difference
from tests.engine.test_image_inputs import png, scene

TOLERANCE = 2


def make_ip_adapter(model: str, directory, seed: int = 0):
    """A plain IP-Adapter in the layout diffusers' load_ip_adapter reads, random but non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        image_size=32, patch_size=8, projection_dim=32,
    ))
    path = directory / f"ip-{model}-{seed}"
    encoder.save_pretrained(path / "image_encoder")
    unet = UNet2DConditionModel.from_pretrained(builtin_path(model), subfolder="unet")
    cross = unet.config.cross_attention_dim
    tensors = {
        "image_proj.proj.weight": torch.randn(4 * cross, 32, generator=generator) * 0.3,
        "image_proj.proj.bias": torch.randn(4 * cross, generator=generator) * 0.1,
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=generator) * 0.3
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=generator) * 0.3
        key_id += 2
    safetensors.torch.save_file(tensors, str(path / "ip_adapter.safetensors"))
    return path


@pytest.fixture(scope="module")
def ip_dir(tmp_path_factory):
    return make_ip_adapter("tiny-sd1", tmp_path_factory.mktemp("ip"))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig())


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_ip_adapter_matches_diffusers(engine, ip_dir, scale):
    image = scene(40, 40, seed=9)
    spec = RequestSpec(model="tiny-sd1", prompt="a red circle", seed=3, steps=3, guidance_scale=6.0,
                       ip_adapters=(IPAdapterSpec(model=str(ip_dir), image=png(image), scale=scale),))
    request = engine.validate(spec)
    ours = np.stack(engine.generate([request])[0].images)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(builtin_path("tiny-sd1"))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(resolve_scheduler(request.scheduler), dict(pipe.scheduler.config))
    pipe.load_ip_adapter(str(ip_dir), subfolder="", weight_name="ip_adapter.safetensors",
                         image_encoder_folder="image_encoder")
    pipe.set_ip_adapter_scale(scale)
    theirs = pipe(request.prompt, num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(request.seed), ip_adapter_image=image,
                  output_type="np").images
    theirs = (theirs * 255).round().astype(np.uint8)
    assert max_pixel_difference(ours, theirs) <= TOLERANCE
    plain = engine.generate([engine.validate(RequestSpec(**{**spec.__dict__, "ip_adapters": ()}))])[0].images[0]
    if scale == 0.0:
        assert max_pixel_difference(ours[0], plain) <= TOLERANCE
    else:
        assert max_pixel_difference(ours[0], plain) > 10


def test_ip_rows_mix_with_plain_rows(engine, ip_dir):
    specs = [
        RequestSpec(model="tiny-sd1", prompt="a cat", seed=1, steps=3),
        RequestSpec(model="tiny-sd1", prompt="a dog", seed=2, steps=3,
                    ip_adapters=(IPAdapterSpec(model=str(ip_dir), image=png(scene(seed=1)), scale=0.7),)),
        RequestSpec(model="tiny-sd1", prompt="a cow", seed=3, steps=4, guidance_scale=1.0,
                    ip_adapters=(IPAdapterSpec(model=str(ip_dir), image=png(scene(seed=2))),)),
    ]
    requests = [engine.validate(s) for s in specs]
    together = engine.generate(requests)
    for request, mixed in zip(requests, together):
        assert max_pixel_difference(engine.generate([request])[0].images[0], mixed.images[0]) <= TOLERANCE


def test_ip_adapter_for_another_cross_attention_width_is_refused_at_validation(engine, tmp_path):
    # Refused when the request names it, reading no weights, with the reason: not an INTERNAL
    # failure inside the UNet call (where a width mismatch would otherwise surface).
    from sdserve.errors import InvalidArgument

    sd1_cross = UNet2DConditionModel.load_config(builtin_path("tiny-sd1"), subfolder="unet")["cross_attention_dim"]
    sdxl_cross = UNet2DConditionModel.load_config(builtin_path("tiny-sdxl"), subfolder="unet")["cross_attention_dim"]
    assert sd1_cross != sdxl_cross, "the two tiny models share a width: the test proves nothing"
    # Only what validation reads (the keys' shapes): a full IP-Adapter costs a UNet build.
    sdxl_ip = tmp_path / "ip-sdxl"
    (sdxl_ip / "image_encoder").mkdir(parents=True)
    safetensors.torch.save_file({"image_proj.proj.weight": torch.zeros(4 * sdxl_cross, 32),
                                 "ip_adapter.1.to_k_ip.weight": torch.zeros(64, sdxl_cross)},
                                str(sdxl_ip / "ip_adapter.safetensors"))
    spec = RequestSpec(model="tiny-sd1", prompt="x", ip_adapters=(IPAdapterSpec(model=str(sdxl_ip), image=b"x"),))
    with pytest.raises(InvalidArgument) as info:
        engine.validate(spec)
    assert info.value.field == "ip_adapters[0].model"
    assert f"cross-attention {sdxl_cross} vs {sd1_cross}" in str(info.value)
