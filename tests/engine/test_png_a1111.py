"""The PNG `parameters` chunk reads back through A1111's parser with every field, and its hashes
follow A1111's conventions (computed here independently from the files)."""

import hashlib
import json
import struct

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from sdserve.engine.controlnet import ControlUnit
from sdserve.engine.ip_adapter import IPAdapterUnit
from sdserve.engine.png import encode_png, parameters_text, parse_parameters, read_parameters
from sdserve.engine.request import EmbeddingEntry, EngineRequest, StackEntry


def _request(tmp_path, **changes) -> EngineRequest:
    lora = tmp_path / "my,lora.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 3)}, str(lora))
    tagged = tmp_path / "tagged.safetensors"
    save_file({"a": torch.zeros(4)}, str(tagged), metadata={"sshs_model_hash": "ab" * 32})
    embedding = tmp_path / "style.safetensors"
    save_file({"emb_params": torch.randn(2, 8)}, str(embedding))
    fields = dict(
        model="/models/some/dreamshaper", prompt="a cat, (fluffy:1.2)\nsecond line",
        negative_prompt="blurry: bad", seed=123456789, steps=17, guidance_scale=6.5,
        scheduler="DPM++ 2M Karras", width=512, height=768, num_images=2,
        adapters=(StackEntry("my,lora.safetensors", str(lora), 0.8, 0.0, 1.0),
                  StackEntry("tagged", str(tagged), -1.5, 0.25, 0.75)),
        embedding_refs=(EmbeddingEntry("style.safetensors", str(embedding), "style"),),
        init_image=Image.new("RGB", (512, 768)), strength=0.6, clip_skip=2,
        guidance_start=0.1, guidance_end=0.9, prompt_syntax="a1111",
        controlnets=(ControlUnit("canny-net", None, 0.9, 0.0, 0.5, preprocess="canny"),),
        ip_adapters=(IPAdapterUnit("/x/ip-plus", None, 0.6),),
    )
    fields.update(changes)
    return EngineRequest(**fields)


def _addnet(path) -> str:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert json.loads(data[8 : 8 + n])  # the header really ends there
    return hashlib.sha256(data[8 + n :]).hexdigest()


def test_every_field_reads_back_through_a1111s_parser(tmp_path):
    request = _request(tmp_path)
    text = parameters_text(request, image_index=1, model_hash="0123456789")
    parsed = parse_parameters(text)
    lora_hash = _addnet(tmp_path / "my,lora.safetensors")[:12]
    ti_hash = hashlib.sha256((tmp_path / "style.safetensors").read_bytes()).hexdigest()[:12]
    assert parsed == {
        "Prompt": "a cat, (fluffy:1.2)\nsecond line",
        "Negative prompt": "blurry: bad",
        "Steps": "17",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "6.5",
        "Seed": "123456789",
        "Size-1": "512",
        "Size-2": "768",
        "Model hash": "0123456789",
        "Model": "dreamshaper",
        "Batch size": "2",
        "Batch pos": "1",
        "Denoising strength": "0.6",
        "Clip skip": "2",
        "Guidance interval": "0.1-0.9",
        "Prompt syntax": "a1111",
        "Lora hashes": f"mylora: {lora_hash}, tagged: {'ab' * 6}",
        "Lora stack": "mylora: 0.8 0 1, tagged: -1.5 0.25 0.75",
        "TI hashes": f"style: {ti_hash}",
        "ControlNet 0": "Module: canny, Model: canny-net, Weight: 0.9, Guidance Start: 0, Guidance End: 0.5",
        "ControlNet 1": "Module: ip-adapter, Model: ip-plus, Weight: 0.6",
        "Version": "sdserve 0.1.0",
    }
    # the quoted values are quoted as A1111 writes them (json, for ',' and ':')
    assert 'Lora hashes: "mylora: ' in text and "Steps: 17, Sampler: DPM++ 2M, Schedule type: Karras" in text


def test_plain_request_writes_a1111s_minimal_form(tmp_path):
    request = _request(tmp_path, negative_prompt=None, scheduler="euler_a", num_images=1, adapters=(),
                       embedding_refs=(), init_image=None, strength=1.0, clip_skip=1,
                       guidance_start=0.0, guidance_end=1.0, prompt_syntax="plain", model="tiny-sd1",
                       controlnets=(), ip_adapters=(),
                       prompt="a red circle")
    text = parameters_text(request)
    assert text == ("a red circle\nSteps: 17, Sampler: Euler a, Schedule type: Uniform, CFG scale: 6.5, "
                    "Seed: 123456789, Size: 512x768, Model: tiny-sd1, Version: sdserve 0.1.0")
    parsed = parse_parameters(text)
    assert parsed["Negative prompt"] == "" and parsed["Clip skip"] == "1"  # A1111's defaults


def test_chunk_survives_the_png(tmp_path):
    text = parameters_text(_request(tmp_path))
    data = encode_png(np.zeros((4, 4, 3), np.uint8), text)
    assert read_parameters(data) == text
    assert read_parameters(encode_png(np.zeros((4, 4, 3), np.uint8), "")) == ""


def test_model_hash_is_the_single_files_sha256_prefix(tmp_path):
    from sdserve.engine.png import model_shorthash
    from sdserve.models.single_file import SOURCE_FILE

    digest = hashlib.sha256(b"checkpoint").hexdigest()
    converted = tmp_path / digest
    converted.mkdir()
    assert model_shorthash(converted) == ""  # not (yet) a converted single file
    (converted / SOURCE_FILE).write_text("{}")
    assert model_shorthash(converted) == digest[:10]
    plain = tmp_path / "diffusers-dir"
    plain.mkdir()
    (plain / SOURCE_FILE).write_text("{}")
    assert model_shorthash(plain) == ""
