"""Textual inversion and hypernetworks per request.

Textual inversion is checked against diffusers' load_textual_inversion (multi-vector, in the
prompt and the negative prompt, SD 1.x and SDXL); hypernetworks against a closed-form reference:
diffusers' UNet with an attention processor that applies A1111's formula by hand
(`tests/adapters/test_hypernetwork.hand_forward`) to the k/v context of every attention layer.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from sdserve.adapters.convert import convert_file
from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.request import EmbeddingSpec, HypernetworkSpec
from sdserve.engine.schedulers import make_scheduler, resolve_scheduler
from sdserve.models.builtin import builtin_path
from tests.adapters.test_hypernetwork import a1111_hypernetwork, hand_forward
from tests.engine.oracle import max_pixel_difference

TOLERANCE = 2


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig())


def _pipe(model: str):
    if "xl" in model:
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(builtin_path(model), add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(builtin_path(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, request, **kwargs):
    pipe.scheduler = make_scheduler(resolve_scheduler(request.scheduler), dict(pipe.scheduler.config))
    out = pipe(request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=request.steps,
               guidance_scale=request.guidance_scale, width=request.width, height=request.height,
               generator=torch.Generator("cpu").manual_seed(request.seed), output_type="np", **kwargs).images
    return (out * 255).round().astype(np.uint8)


def test_multi_vector_embedding_matches_diffusers_sd1(engine, tmp_path):
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "cat-toy.safetensors"
    safetensors.torch.save_file({"<cat-toy>": vectors}, str(path))
    style = tmp_path / "style.safetensors"
    safetensors.torch.save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(2))},
                                str(style))
    spec = RequestSpec(model="tiny-sd1", prompt="a <cat-toy> on a table, <style>", negative_prompt="blurry <style>",
                       seed=4, steps=3, guidance_scale=6.0,
                       embeddings=(EmbeddingSpec(path=str(path)), EmbeddingSpec(path=str(style), token="<style>")))
    request = engine.validate(spec)
    ours = np.stack(engine.generate([request])[0].images)
    pipe = _pipe("tiny-sd1")
    pipe.load_textual_inversion(str(path))
    pipe.load_textual_inversion(str(style), token="<style>")
    theirs = _run(pipe, request)
    assert max_pixel_difference(ours, theirs) <= TOLERANCE
    # Without the embedding the same prompt is plain text: the token exists only where asked for.
    plain = engine.generate([engine.validate(RequestSpec(**{**spec.__dict__, "embeddings": ()}))])[0]
    assert max_pixel_difference(ours[0], plain.images[0]) > 10


def test_sdxl_embedding_feeds_both_encoders(engine, tmp_path):
    path = tmp_path / "sdxl-emb.safetensors"
    safetensors.torch.save_file({
        "clip_l": torch.randn(2, 32, generator=torch.Generator().manual_seed(3)),
        "clip_g": torch.randn(2, 32, generator=torch.Generator().manual_seed(4)),
    }, str(path))
    spec = RequestSpec(model="tiny-sdxl", prompt="a photo of <thing>", seed=2, steps=3, guidance_scale=5.0,
                       embeddings=(EmbeddingSpec(path=str(path), token="<thing>"),))
    request = engine.validate(spec)
    ours = np.stack(engine.generate([request])[0].images)
    pipe = _pipe("tiny-sdxl")
    state = safetensors.torch.load_file(str(path))
    pipe.load_textual_inversion(state["clip_l"], token="<thing>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<thing>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    assert max_pixel_difference(ours, _run(pipe, request)) <= TOLERANCE


class HandHypernetworkProcessor:
    """diffusers' attention with A1111's hypernetwork formula applied by hand to k/v contexts."""

    def __init__(self, saved: dict, structure, activation, strength: float) -> None:
        self.saved, self.structure, self.activation, self.strength = saved, structure, activation, strength

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key_context = value_context = context
        states = self.saved.get(context.shape[-1])
        if states is not None:
            key_context, value_context = (
                hand_forward(context, state, self.structure, self.activation, False, False, self.strength).float()
                for state in states
            )
        key, value = attn.to_k(key_context), attn.to_v(value_context)
        head_dim = key.shape[-1] // attn.heads

        def heads(x):
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def test_hypernetwork_matches_the_a1111_formula(engine, tmp_path):
    structure, activation = [1, 2, 1], "relu"
    saved, _ = a1111_hypernetwork([32, 64], structure, activation, False, False)
    torch.save(saved, tmp_path / "hn.pt")
    convert_file(tmp_path / "hn.pt", tmp_path / "hn.safetensors")
    spec = RequestSpec(model="tiny-sd1", prompt="a cat", seed=8, steps=3, guidance_scale=5.0,
                       hypernetworks=(HypernetworkSpec(path=str(tmp_path / "hn.safetensors"), strength=0.7),))
    request = engine.validate(spec)
    ours = np.stack(engine.generate([request])[0].images)
    pipe = _pipe("tiny-sd1")
    pipe.unet.set_attn_processor(HandHypernetworkProcessor(saved, structure, activation, 0.7))
    theirs = _run(pipe, request)
    assert max_pixel_difference(ours, theirs) <= TOLERANCE
    plain = engine.generate([engine.validate(RequestSpec(**{**spec.__dict__, "hypernetworks": ()}))])[0]
    assert max_pixel_difference(ours[0], plain.images[0]) > 10


def test_embeddings_and_hypernetworks_mix_in_one_batch(engine, tmp_path):
    saved, _ = a1111_hypernetwork([32, 64], [1, 2, 1], "tanh", True, False)
    torch.save(saved, tmp_path / "hn.pt")
    convert_file(tmp_path / "hn.pt", tmp_path / "hn.safetensors")
    # Seeded and large enough that the embedding visibly changes the image.
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(11)) * 3
    safetensors.torch.save_file({"<x>": vectors}, str(tmp_path / "x.safetensors"))
    hn = HypernetworkSpec(path=str(tmp_path / "hn.safetensors"))
    emb = EmbeddingSpec(path=str(tmp_path / "x.safetensors"))
    specs = [
        RequestSpec(model="tiny-sd1", prompt="a <x>", seed=1, steps=3),
        RequestSpec(model="tiny-sd1", prompt="a <x>", seed=1, steps=3, embeddings=(emb,)),
        RequestSpec(model="tiny-sd1", prompt="a dog", seed=2, steps=4, hypernetworks=(hn,)),
        RequestSpec(model="tiny-sd1", prompt="a <x> dog", seed=3, steps=3, guidance_scale=1.0, embeddings=(emb,),
                    hypernetworks=(HypernetworkSpec(path=hn.path, strength=-0.5),)),
    ]
    requests = [engine.validate(s) for s in specs]
    together = engine.generate(requests)
    for request, mixed in zip(requests, together):
        assert max_pixel_difference(engine.generate([request])[0].images[0], mixed.images[0]) <= TOLERANCE
    assert max_pixel_difference(together[0].images[0], together[1].images[0]) > 10
