"""LoHa and LoKr served per row by the engine: each alone gives diffusers' image with lycoris-lora's own
deltas merged into the weights, and a batch mixing LoRA, LoHa and LoKr stacks gives every request
its image alone."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import safetensors.torch
import torch

from sdserve.adapters import targets_of
from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.request import AdapterSpec
from tests.adapters.lycoris_factory import lycoris_deltas, make_lycoris
from tests.engine.lora_cases import model_components, write_model_lora
from tests.engine.oracle import diffusers_images, generate_together_and_alone, max_pixel_difference, pipeline

MODEL = "tiny-sd1"
TOLERANCE = 2


def _plan(targets, suffixes: dict[str, tuple[str, dict]]) -> dict[str, tuple[str, dict]]:
    return {target: plan for target in targets for suffix, plan in suffixes.items()
            if target.startswith(("unet.", "text_encoder.")) and target.endswith(suffix)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lycoris")
    components = model_components(MODEL)
    targets = targets_of(components)
    loha = _plan(targets, {
        "to_q": ("loha", {"lora_dim": 4, "alpha": 2.0}), "to_v": ("loha", {"lora_dim": 8, "alpha": 8.0}),
        "ff.net.2": ("loha", {"lora_dim": 2, "alpha": 1.0}),
        "conv1": ("loha", {"lora_dim": 2, "alpha": 1.0}),
        "conv2": ("loha", {"lora_dim": 2, "alpha": 2.0, "use_tucker": True}),
        "self_attn.k_proj": ("loha", {"lora_dim": 2, "alpha": 1.0}),
    })
    lokr = _plan(targets, {
        "to_k": ("lokr", {"lora_dim": 2, "alpha": 1.0}), "to_out.0": ("lokr", {"lora_dim": 2, "full_matrix": True}),
        "conv1": ("lokr", {"lora_dim": 2, "alpha": 2.0, "factor": 4}),
        "conv2": ("lokr", {"lora_dim": 2, "alpha": 1.0, "factor": 4, "use_tucker": True}),
    })
    paths, deltas = {}, {}
    for name, plan, seed in (("loha", loha, 1), ("lokr", lokr, 2)):
        state = make_lycoris(components, plan, seed=seed, std=0.5)
        paths[name] = directory / f"{name}.safetensors"
        safetensors.torch.save_file(state, paths[name])
        deltas[name] = lycoris_deltas(components, state)
    paths["lora"] = write_model_lora(MODEL, directory, "lora", rank=4, alpha=4.0, text_encoder=True, seed=3)
    return paths, deltas


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(max_batch_rows=16))


def _spec(files, stack, seed=7, steps=3, **kwargs):
    paths, _ = files
    adapters = tuple(AdapterSpec(path=str(paths[name]), scale=scale, start=start, end=end)
                     for name, scale, start, end in stack)
    return RequestSpec(model=MODEL, prompt=kwargs.pop("prompt", "a red circle"), seed=seed, steps=steps, width=32,
                       height=32, adapters=adapters, **kwargs)


@contextmanager
def _merged(deltas: dict[str, torch.Tensor], scale: float):
    """The oracle pipeline's weights with scale · ΔW added, put back afterwards (it is shared)."""
    pipe = pipeline(MODEL)
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    saved = {}
    with torch.no_grad():
        for target, delta in deltas.items():
            component, _, path = target.partition(".")
            weight = modules[component].get_submodule(path).weight
            saved[target] = weight.detach().clone()
            weight += (scale * delta).reshape(weight.shape).to(weight.dtype)
    try:
        yield
    finally:
        with torch.no_grad():
            for target, original in saved.items():
                component, _, path = target.partition(".")
                modules[component].get_submodule(path).weight.copy_(original)


@pytest.mark.parametrize(("kind", "scale"), [("loha", 0.8), ("lokr", -0.6)])
def test_alone_matches_diffusers_with_lycoris_merged(engine, files, kind, scale):
    _, deltas = files
    request = engine.validate(_spec(files, [(kind, scale, 0.0, 1.0)]))
    served = engine.generate([request])[0].images[0]
    base = engine.generate([engine.validate(_spec(files, []))])[0].images[0]
    assert max_pixel_difference(served, base) > 20, "the adapter must change the image"
    with _merged(deltas[kind], scale):
        expected = diffusers_images(request)[0]
    assert max_pixel_difference(served, expected) <= TOLERANCE


def test_mixed_batch_gives_each_request_its_image_alone(engine, files):
    stacks = [
        [("loha", 1.0, 0.0, 1.0)],
        [("lokr", 0.5, 0.0, 1.0)],
        [("lora", 1.0, 0.0, 1.0)],
        [("loha", -0.7, 0.0, 1.0), ("lora", 0.5, 0.0, 1.0)],
        [("lokr", 1.2, 0.34, 1.0), ("loha", 0.4, 0.0, 1.0)],
        [("lora", 0.8, 0.0, 0.67), ("lokr", -1.0, 0.0, 1.0), ("loha", 0.3, 0.34, 1.0)],
        [],
        [("loha", 0.5, 0.0, 0.67)],
    ]
    requests = [engine.validate(_spec(files, stack, seed=20 + i, steps=3, prompt=["a cat", "a red circle"][i % 2],
                                      guidance_scale=[7.5, 1.0][i % 2]))
                for i, stack in enumerate(stacks)]
    together, calls, differences = generate_together_and_alone(engine, requests)
    assert max(calls) >= 5, "different stacks must share UNet calls"
    assert max(differences) <= TOLERANCE, differences
