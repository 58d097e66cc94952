"""One batch where every request has a different mix of LoRA stack, ControlNet, IP-Adapter,
embedding, hypernetwork and image input: each gets the pixels it gets alone."""

from __future__ import annotations

import safetensors.torch
import torch

from sdserve.adapters.convert import convert_file
from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.controlnet import ControlSpec
from sdserve.engine.ip_adapter import IPAdapterSpec
from sdserve.engine.request import AdapterSpec, EmbeddingSpec, HypernetworkSpec
from tests.adapters.test_hypernetwork import a1111_hypernetwork
from tests.engine.lora_cases import write_model_lora
from tests.engine.oracle import max_pixel_difference
from tests.engine.test_controlnet import make_controlnet
from tests.engine.test_image_inputs import mask_image, png, scene
from tests.engine.test_ip_adapter import make_ip_adapter

TOLERANCE = 2


def test_every_mix_in_one_batch_equals_alone(tmp_path):
    lora = write_model_lora("tiny-sd1", tmp_path, "style", rank=4, alpha=8.0, text_encoder=True)
    slider = write_model_lora("tiny-sd1", tmp_path, "slider", rank=2, alpha=2.0, seed=5)
    net = make_controlnet("tiny-sd1", tmp_path, 7)
    ip = make_ip_adapter("tiny-sd1", tmp_path, 1)
    safetensors.torch.save_file({"<t>": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
                                str(tmp_path / "t.safetensors"))
    saved, _ = a1111_hypernetwork([32, 64], [1, 2, 1], "relu", False, False)
    torch.save(saved, tmp_path / "hn.pt")
    convert_file(tmp_path / "hn.pt", tmp_path / "hn.safetensors")

    lora_stack = (AdapterSpec(path=str(lora), scale=0.8), AdapterSpec(path=str(slider), scale=-1.5, start=0.3))
    control = (ControlSpec(model=str(net), image=png(scene(seed=3)), scale=0.9, end=0.8),)
    ip_unit = (IPAdapterSpec(model=str(ip), image=png(scene(seed=4)), scale=0.6),)
    embedding = (EmbeddingSpec(path=str(tmp_path / "t.safetensors")),)
    hypernetwork = (HypernetworkSpec(path=str(tmp_path / "hn.safetensors"), strength=0.5),)
    init = dict(init_image=png(scene(seed=5)), strength=0.7)
    mixes = [
        {},
        dict(adapters=lora_stack),
        dict(controlnets=control),
        dict(ip_adapters=ip_unit),
        dict(embeddings=embedding, prompt="a <t> in a field"),
        dict(hypernetworks=hypernetwork),
        dict(**init),
        dict(adapters=lora_stack[:1], controlnets=control, ip_adapters=ip_unit),
        dict(embeddings=embedding, hypernetworks=hypernetwork, prompt="a <t>", **init),
        dict(adapters=lora_stack[1:], ip_adapters=ip_unit, init_image=png(scene(seed=6)), mask=png(mask_image())),
        dict(controlnets=control, embeddings=embedding, adapters=lora_stack, prompt="<t>", guidance_scale=1.0),
        dict(adapters=lora_stack, controlnets=control, ip_adapters=ip_unit, embeddings=embedding,
             hypernetworks=hypernetwork, prompt="a <t> dog", **init),
    ]
    engine = Engine(EngineConfig(max_batch_rows=24))
    requests = []
    for index, mix in enumerate(mixes):
        fields = {"prompt": "a red circle", "seed": 10 + index, "steps": 3 + index % 2, "guidance_scale": 5.0, **mix}
        requests.append(engine.validate(RequestSpec(model="tiny-sd1", **fields)))
    rows_per_call = []
    original = engine.runner.step

    def spy(model, batch):
        rows_per_call.append(len(batch.entries))
        return original(model, batch)

    engine.runner.step = spy
    together = engine.generate(requests)
    engine.runner.step = original
    assert max(rows_per_call) >= 10  # they really shared UNet calls
    for request, mixed in zip(requests, together):
        assert not isinstance(mixed, Exception), mixed
        alone = engine.generate([request])[0]
        assert max_pixel_difference(alone.images[0], mixed.images[0]) <= TOLERANCE
