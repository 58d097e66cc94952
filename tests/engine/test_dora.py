"""DoRA (PEFT use_dora=True) through sdserve gives diffusers + PEFT's pixels, per request and per row.

The oracle is diffusers' `load_lora_weights` + `set_adapters` on a file PEFT made on tiny-sd1's
own UNet and diffusers' `save_lora_weights` wrote; a mixed batch (DoRA at two strengths, a plain
LoRA, no adapter) gives every request the image it gets alone.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from sdserve.adapters import load_lora, targets_of
from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.request import AdapterSpec
from sdserve.errors import AdapterError, SdserveError
from sdserve.kernels.lora_dora import dora_gain, dora_terms
from tests.adapters.lora_factory import CLIP_ATTENTION
from tests.engine.lora_cases import UNET_ATTENTION, UNET_CONV, model_components, write_model_lora
from tests.engine.oracle import max_pixel_difference, pipeline

TOLERANCE = 2
MODEL = "tiny-sd1"


def _randomized_dora(component, config: LoraConfig, generator: torch.Generator) -> dict:
    model = inject_adapter_in_model(copy.deepcopy(config), copy.deepcopy(component))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_magnitude_vector" in param_name:
                # PEFT starts m at ‖W‖ (the identity while B = 0): move it off that.
                param.mul_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
            elif "lora_" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return get_peft_model_state_dict(model)


def write_dora(directory, name: str, *, rank: int = 4, alpha: float = 8.0, targets=UNET_ATTENTION + UNET_CONV,
               text_encoder: bool = False, seed: int = 0):
    """A DoRA file as diffusers writes it: PEFT's state dicts, the configs in the header."""
    components = model_components(MODEL)
    generator = torch.Generator().manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), use_dora=True)
    extra = {}
    if text_encoder:
        te_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=CLIP_ATTENTION, use_dora=True)
        extra = dict(text_encoder_lora_layers=_randomized_dora(components["text_encoder"], te_config, generator),
                     text_encoder_lora_adapter_metadata=te_config.to_dict())
    StableDiffusionPipeline.save_lora_weights(
        str(directory), unet_lora_layers=_randomized_dora(components["unet"], config, generator),
        unet_lora_adapter_metadata=config.to_dict(), weight_name=f"{name}.safetensors", **extra)
    return directory / f"{name}.safetensors"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig())


@pytest.fixture(scope="module")
def dora_path(tmp_path_factory):
    return write_dora(tmp_path_factory.mktemp("dora"), "dora")


def _spec(adapters=(), seed: int = 42) -> RequestSpec:
    return RequestSpec(model=MODEL, prompt="a red circle", negative_prompt="blurry", seed=seed, steps=4,
                       guidance_scale=6.0, scheduler="euler", adapters=tuple(adapters))


def _diffusers(engine, spec: RequestSpec, path, scale: float) -> np.ndarray:
    request = engine.validate(spec)
    pipe = pipeline(MODEL)
    from sdserve.engine.schedulers import make_scheduler, resolve_scheduler

    original = pipe.scheduler
    pipe.scheduler = make_scheduler(resolve_scheduler(request.scheduler), dict(original.config))
    pipe.load_lora_weights(str(path), adapter_name="dora")
    _restore_text_encoder_magnitudes(pipe, path)
    pipe.set_adapters(["dora"], [scale])
    try:
        images = pipe(request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=request.steps,
                      guidance_scale=request.guidance_scale, width=request.width, height=request.height,
                      generator=torch.Generator("cpu").manual_seed(request.seed), output_type="np").images
    finally:
        pipe.unload_lora_weights()
        pipe.scheduler = original
    return (images * 255).round().astype(np.uint8)


def _restore_text_encoder_magnitudes(pipe, path) -> None:
    """diffusers 0.42 loads a text encoder's DoRA factors but not its magnitudes (reported MISSING,
    left at ‖W‖); put the file's into PEFT's layers, whose forward is the oracle's math."""
    tensors = safetensors.torch.load_file(str(path))
    with torch.no_grad():
        for name, module in pipe.text_encoder.named_modules():
            vectors = getattr(module, "lora_magnitude_vector", None)
            if vectors is None or "dora" not in vectors:
                continue
            stem = name.removeprefix("text_model.")
            key = next(k for k in (f"text_encoder.{stem}.lora_magnitude_vector",
                                   f"text_encoder.text_model.{stem}.lora_magnitude_vector") if k in tensors)
            vectors["dora"].weight.copy_(tensors[key])


def _ours(engine, spec: RequestSpec) -> np.ndarray:
    return np.stack(engine.generate([engine.validate(spec)])[0].images)


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_dora_matches_diffusers(engine, dora_path, scale):
    spec = _spec([AdapterSpec(path=str(dora_path), scale=scale)])
    ours = _ours(engine, spec)
    theirs = _diffusers(engine, spec, dora_path, scale)
    difference = max_pixel_difference(ours, theirs)
    print(f"DoRA scale {scale}: max pixel difference {difference}")
    assert difference <= TOLERANCE
    # The adapter must matter, and so must its magnitudes (beyond the plain LoRA of its factors).
    assert max_pixel_difference(ours, _ours(engine, _spec())) > 10


def test_text_encoder_dora_matches_diffusers(engine, tmp_path):
    path = write_dora(tmp_path, "dora_te", targets=UNET_ATTENTION, text_encoder=True, seed=7)
    spec = _spec([AdapterSpec(path=str(path), scale=0.6)])
    ours = _ours(engine, spec)
    difference = max_pixel_difference(ours, _diffusers(engine, spec, path, 0.6))
    print(f"DoRA on UNet and text encoder, scale 0.6: max pixel difference {difference}")
    assert difference <= TOLERANCE
    assert max_pixel_difference(ours, _ours(engine, _spec())) > 10


def test_dora_differs_from_its_lora_part(engine, dora_path, tmp_path):
    tensors = safetensors.torch.load_file(str(dora_path))
    with safetensors.safe_open(str(dora_path), "pt") as handle:
        metadata = handle.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])
    config["unet.use_dora"] = False
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, str(plain),
                                metadata={**metadata, "lora_adapter_metadata": json.dumps(config)})
    dora = _ours(engine, _spec([AdapterSpec(path=str(dora_path), scale=1.0)]))
    lora = _ours(engine, _spec([AdapterSpec(path=str(plain), scale=1.0)]))
    assert max_pixel_difference(dora, lora) > 10


def test_mixed_batch_rows_match_alone(engine, dora_path, tmp_path):
    lora = write_model_lora(MODEL, tmp_path, "plain", rank=4, alpha=4.0, unet_targets=UNET_ATTENTION, seed=3)
    specs = [
        _spec([AdapterSpec(path=str(dora_path), scale=1.0)], seed=1),
        _spec([AdapterSpec(path=str(lora), scale=0.8)], seed=2),
        _spec([AdapterSpec(path=str(dora_path), scale=0.6)], seed=3),
        _spec([], seed=4),
        _spec([AdapterSpec(path=str(dora_path), scale=-0.5)], seed=5),
    ]
    requests = [engine.validate(spec) for spec in specs]
    together = engine.generate(requests)
    differences = []
    for spec, result in zip(specs, together, strict=True):
        alone = _ours(engine, spec)
        differences.append(max_pixel_difference(np.stack(result.images), alone))
    print(f"mixed batch vs alone: max pixel differences {differences}")
    assert max(differences) <= 1


def test_dora_and_lora_on_one_module_refused(engine, dora_path, tmp_path):
    lora = write_model_lora(MODEL, tmp_path, "plain", rank=4, alpha=4.0, unet_targets=["to_q"], seed=3)
    spec = _spec([AdapterSpec(path=str(lora), scale=1.0), AdapterSpec(path=str(dora_path), scale=1.0)])
    outcome = engine.generate([engine.validate(spec)])[0]
    assert isinstance(outcome, AdapterError), outcome
    message = str(outcome)
    assert "DoRA module" in message and "alone on its modules" in message and "\n" not in message
    # Alone, each of the two runs.
    assert not isinstance(engine.generate([engine.validate(_spec(spec.adapters[1:]))])[0], SdserveError)


@pytest.mark.parametrize("views", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_rows_without_dora_bit_identical(kind, views):
    """In one call, rows reading no DoRA slot get exactly the output they get with no DoRA slot placed;
    the DoRA row gets m / ‖W + s·c·B A‖ ⊙ (W x + s·c·B A x) + bias."""
    from sdserve.adapters import spec_of
    from sdserve.kernels import LoRABatchState, LoRALayerState, ModulePool, lora_conv2d, lora_linear

    generator = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(8, 6) if kind == "linear" else torch.nn.Conv2d(3, 6, 3, padding=1)
    x = torch.randn(3, 5, 8, generator=generator) if kind == "linear" else torch.randn(3, 3, 4, 4, generator=generator)
    spec = spec_of(base)
    columns = spec.a_columns
    a, b = torch.randn(2, columns, generator=generator), torch.randn(6, 2, generator=generator)
    a2, b2 = torch.randn(3, columns, generator=generator), torch.randn(6, 3, generator=generator)
    magnitude = torch.rand(6, generator=generator) + 0.5
    stacks = (((0, 0.7),), ((1, 1.0),), ())
    outputs = []
    for with_dora in (False, True):
        batch = LoRABatchState(max_rows=3, max_stack=2, device=torch.device("cpu"))
        layer = LoRALayerState(batch)
        layer.pool = ModulePool(spec, 2, torch.device("cpu"), torch.float32, views=views)
        layer.pool.place(0, a, b, 0.5, (magnitude, base.weight) if with_dora else None)
        layer.pool.place(1, a2, b2, 2.0)
        call = lora_linear if kind == "linear" else lora_conv2d
        with torch.no_grad():
            outputs.append(call(x, base, layer, stacks))
    plain, dora = outputs
    assert torch.equal(plain[1:], dora[1:])
    with torch.no_grad():
        weight = base.weight.reshape(6, -1) + 0.7 * 0.5 * (b @ a)
        gain = magnitude / weight.norm(dim=1)
        shape = (1, 6) if kind == "linear" else (6, 1, 1)
        bias = base.bias.view(shape)
        expected = (plain[0] - bias) * gain.view(shape) + bias
    torch.testing.assert_close(dora[0], expected, rtol=1e-5, atol=1e-5)


def test_closed_form_norm_matches_direct():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, 3, 3, generator=generator)
    a, b = torch.randn(2, 45, generator=generator), torch.randn(6, 2, generator=generator)
    magnitude = torch.rand(6, generator=generator) + 0.5
    terms = dora_terms(magnitude, weight, a, b, 0.5, torch.device("cpu"))
    for strength in (1.0, 0.6, -1.3, 0.0):
        direct = weight.double().reshape(6, -1) + strength * 0.5 * (b.double() @ a.double())
        expected = magnitude.double() / direct.norm(dim=1)
        torch.testing.assert_close(dora_gain(terms, strength).double(), expected, rtol=1e-5, atol=0)


def _bad_magnitude_file(path, tmp_path, value):
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    key = next(k for k in sorted(tensors) if k.endswith("to_q.lora_magnitude_vector"))
    tensors[key] = value(tensors[key])
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, str(bad), metadata=metadata)
    return bad, key


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (lambda m: m[:-1].clone(), "has shape"),
        (lambda m: m.reshape(1, -1).clone(), "has shape"),
        (lambda m: torch.where(torch.arange(m.numel()) == 1, float("nan"), m), "NaN or infinite"),
        (lambda m: torch.full_like(m, float("inf")), "NaN or infinite"),
    ],
)
def test_bad_magnitude_refused(dora_path, tmp_path, value, problem):
    components = model_components(MODEL)
    targets = targets_of({"unet": components["unet"]})
    bad, key = _bad_magnitude_file(dora_path, tmp_path, value)
    with pytest.raises(AdapterError) as refused:
        load_lora(str(bad), "bad", targets)
    message = str(refused.value)
    assert problem in message and "DoRA magnitude" in message and key[:60] in message and "\n" not in message


def test_kohya_dora_scale_serves_as_peft(engine, dora_path, tmp_path):
    """LyCORIS' kohya-layout DoRA ("dora_scale", [out, 1] / [out, 1, 1, 1]) gives the PEFT file's images."""
    from sdserve.adapters.formats.kohya import flatten

    tensors = safetensors.torch.load_file(str(dora_path))
    with safetensors.safe_open(str(dora_path), "pt") as handle:
        alpha = json.loads(handle.metadata()["lora_adapter_metadata"])["unet.lora_alpha"]
    kohya = {}
    for key, tensor in tensors.items():
        path, _, role = key.removeprefix("unet.").partition(".lora_")
        stem = "lora_unet_" + flatten(path)
        if role == "A.weight":
            kohya[f"{stem}.lora_down.weight"] = tensor
            kohya[f"{stem}.alpha"] = torch.tensor(float(alpha))
        elif role == "B.weight":
            kohya[f"{stem}.lora_up.weight"] = tensor
        else:
            out = tensor.numel()
            kohya[f"{stem}.dora_scale"] = tensor.reshape(out, 1) if tensor.ndim == 1 else tensor.reshape(out, 1, 1, 1)
    path = tmp_path / "kohya_dora.safetensors"
    safetensors.torch.save_file(kohya, str(path))
    ours = _ours(engine, _spec([AdapterSpec(path=str(path), scale=0.6)]))
    reference = _ours(engine, _spec([AdapterSpec(path=str(dora_path), scale=0.6)]))
    assert max_pixel_difference(ours, reference) == 0


def test_compile_and_save_refuse_dora(dora_path, tmp_path):
    """Fusing adds deltas; DoRA rescales channels by a norm of the fused weight: refused, not wrong."""
    from sdserve.adapters.save import save_lora
    from sdserve.compile.fuse import stack_deltas
    from sdserve.compile.source import StackLoRA
    from sdserve.errors import InvalidArgument

    targets = targets_of({"unet": model_components(MODEL)["unet"]})
    adapter = load_lora(str(dora_path), "dora", targets)
    assert adapter.dora_targets and all(adapter.modules[t].magnitude.shape == (adapter.modules[t].out_features,)
                                        for t in adapter.dora_targets)
    with pytest.raises(InvalidArgument, match="DoRA"):
        stack_deltas([StackLoRA(adapter=adapter, scale=1.0, sha256="0" * 64, path=dora_path)])
    with pytest.raises(ValueError, match="DoRA"):
        save_lora(adapter, tmp_path / "out.safetensors")


def test_same_dora_twice_in_a_stack_refused(engine, dora_path):
    spec = _spec([AdapterSpec(path=str(dora_path), scale=0.5), AdapterSpec(path=str(dora_path), scale=0.5)])
    outcome = engine.generate([engine.validate(spec)])[0]
    assert isinstance(outcome, AdapterError) and "alone on its modules" in str(outcome)
