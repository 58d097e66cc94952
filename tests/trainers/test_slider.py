"""The text Concept Slider trainer (`sdserve train slider`, sdserve/trainers/slider.py) on tiny-sd1:
the objective against its closed form at step 0, weights that move, same seed same bytes, exact
resume, slider metadata, the file in sdserve and diffusers (same image within 2/255), and the
refusal of positive == negative."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from sdserve.adapters.inspect import describe
from sdserve.cli.main import main
from sdserve.engine import Engine, EngineConfig
from sdserve.engine.request import AdapterSpec
from sdserve.models.builtin import builtin_path
from sdserve.trainers.loop import LoopConfig, seeded_generator, train
from sdserve.trainers.slider import SliderConfig, SliderMethod, combine
from tests.engine.oracle import max_pixel_difference
from tests.trainers.conftest import run_cli
from tests.trainers.test_diffusers_images import TOLERANCE, _diffusers, _moved, _sdserve

MODEL = "tiny-sd1"
TARGET, ANCHOR = "a photo of a dog", "a photo of a cat"
# lr large enough that 4 steps move the image (the loss itself is tiny on a random tiny model).
SLIDER = ["--model", MODEL, "--positive", "large", "--negative", "small", "--target", TARGET, "--anchor", ANCHOR,
          "--pool-size", "2", "--pool-steps", "2", "--lr", "0.05", "--no-progress"]
CONFIG = SliderConfig(positive="large", negative="small", targets=(TARGET,), anchors=(ANCHOR,), pool_size=2,
                      pool_steps=2)


def test_attribute_words_go_after_the_article():
    assert combine("a red circle on the left", "large") == "a large red circle on the left"
    assert combine("an apple", "green") == "an green apple"  # no grammar beyond the article
    assert combine("dog", "large") == "large dog"
    assert combine("", " large ") == "large"


def test_step_zero_objective_matches_its_closed_form(components_of):
    """At step 0 (B = 0) the LoRA at ±1 predicts the frozen model, so the loss is
    eta² · mean((out(pos) - out(neg))²), the anchors' term 0; the oracle is a second copy of the
    model without any LoRA, on prompts written out by hand."""
    eta = 2.0
    components = components_of(MODEL)
    method = SliderMethod(components, SliderConfig(**{**CONFIG.__dict__, "eta": eta}), seed=3)
    shape = (2, components.unet.config.in_channels, 8, 8)
    method._pool = torch.randn(shape, generator=torch.Generator().manual_seed(0))  # [2, C, 8, 8], no engine
    loss = method.step_loss(0, seeded_generator(5, 13, 0))

    oracle = components_of(MODEL)
    generator = seeded_generator(5, 13, 0)  # the same draws, in step_loss's order
    index = int(torch.randint(0, 2, (1,), generator=generator))
    timestep = torch.randint(0, oracle.objective.num_timesteps, (1,), generator=generator)
    noise = torch.randn((1, *shape[1:]), generator=generator)
    noisy = oracle.objective.add_noise(method._pool[index : index + 1], noise, timestep)  # [1, C, 8, 8]
    with torch.no_grad():
        out = {prompt: oracle.predict(noisy, timestep, oracle.encode_text([prompt]))
               for prompt in (TARGET, "a large photo of a dog", "a small photo of a dog")}
        lora_out = method.predict(noisy, timestep, [TARGET])  # the LoRA on, at its trained scale +1
    direction = out["a large photo of a dog"] - out["a small photo of a dog"]
    assert float(direction.abs().max()) > 1e-4  # else the check below proves nothing
    torch.testing.assert_close(lora_out, out[TARGET], rtol=1e-5, atol=1e-6)
    expected = eta**2 * direction.pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-10)


def test_per_row_scales_equal_one_call_per_scale(components_of):
    """step_loss runs the +1 and -1 rows in one UNet call (a per-row LoRA scale); with trained
    (non-zero) factors, each row must equal a call with that scale alone."""
    components = components_of(MODEL)
    method = SliderMethod(components, CONFIG, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in method.lora.layers.values():
            layer.up.normal_(0, 0.5, generator=generator)
    noisy = torch.randn((1, components.unet.config.in_channels, 8, 8), generator=generator)  # [1, C, 8, 8]
    timestep = torch.tensor([500])
    conditioning = components.encode_text([TARGET, ANCHOR, TARGET, ANCHOR])
    with torch.no_grad():
        method.set_scale(torch.tensor([1.0, 1.0, -1.0, -1.0]))
        batched = components.predict(noisy.expand(4, -1, -1, -1), timestep.expand(4), conditioning)
        alone = []
        for row, sign in enumerate((1.0, 1.0, -1.0, -1.0)):
            method.set_scale(sign)
            alone.append(method.predict(noisy, timestep, [(TARGET, ANCHOR)[row % 2]]))
        method.set_scale(0.0)
        frozen = method.predict(noisy, timestep, [TARGET])
    assert float((alone[0] - frozen).abs().max()) > 1e-3  # the factors act, so the scales matter
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Slider files from the CLI: 4 steps straight, and 2 steps (kohya keys) resumed to 4."""
    work = tmp_path_factory.mktemp("slider")
    runs = {
        "first": ["--steps", "4", "--out", str(work / "first.safetensors")],
        "kohya": ["--steps", "2", "--format", "kohya", "--out", str(work / "kohya.safetensors")],
        "resumed": ["--steps", "4", "--out", str(work / "resumed.safetensors"), "--resume", str(work / "kohya.state")],
    }
    outputs = {}
    for name, flags in runs.items():
        assert main(["train", "slider", *SLIDER, *flags]) == 0, name
        outputs[name] = Path(flags[flags.index("--out") + 1])
    return outputs


def test_same_seed_same_bytes_and_resume_is_exact(trained, components_of, tmp_path):
    """The CLI's run, the same run through the Python API, and a 2-step run resumed to 4 (the
    checkpoint holds factors, not the file's layout): one set of bytes."""
    first = trained["first"].read_bytes()
    assert trained["resumed"].read_bytes() == first
    components = components_of(MODEL)
    method = SliderMethod(components, CONFIG, seed=0)
    result = train(method, components, None, LoopConfig(steps=4, lr=0.05, progress=False), tmp_path / "s.safetensors")
    assert len(result.losses) == 4 and all(0 < loss < float("inf") for loss in result.losses)
    assert result.out.read_bytes() == first


def test_weights_move_and_the_metadata_says_slider(trained):
    with safe_open(str(trained["first"]), "pt") as handle:
        metadata = handle.metadata()
        ups = [handle.get_tensor(k) for k in handle.keys() if k.endswith("lora_B.weight")]  # noqa: SIM118 (safe_open has no __iter__)
    assert ups and all(torch.isfinite(u).all() for u in ups)
    assert max(float(u.abs().max()) for u in ups) > 0  # B starts at zero: training moved it
    assert metadata["sdserve_slider"] == "true" and metadata["sdserve_method"] == "slider"
    assert metadata["sdserve_slider_scale_range"] == "-1,1" and metadata["sdserve_slider_start"] == "0"
    assert metadata["sdserve_slider_positive"] == "large" and metadata["sdserve_slider_targets"] == TARGET
    assert metadata["sdserve_steps"] == "4"
    # `sdserve adapters inspect --json` reports it (inspect.describe reads the metadata alone)
    summary = describe(str(trained["kohya"]), "kohya.safetensors")
    assert summary.kind == "LoRA" and summary.slider == {"scale_range": "-1,1", "start": "0"}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(device="cpu", dtype="float32"))


@pytest.mark.parametrize("layout", ["first", "kohya"])
def test_slider_gives_the_same_image_in_sdserve_and_diffusers(trained, engine, layout):
    prompt = TARGET
    ours = _sdserve(engine, model=MODEL, prompt=prompt, adapters=(AdapterSpec(path=str(trained[layout])),))
    pipe = StableDiffusionPipeline.from_pretrained(builtin_path(MODEL))
    pipe.load_lora_weights(str(trained[layout]))
    assert max_pixel_difference(ours, _diffusers(pipe, prompt)) <= TOLERANCE
    assert _moved(engine, ours, prompt)


def test_positive_equal_to_negative_is_one_line_exit_2(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "slider", "--model", MODEL, "--positive", "large", "--negative",
                             " large", "--target", TARGET, "--out", str(tmp_path / "s.safetensors"))
    assert code == 2 and err.count("\n") == 1 and "--positive" in err and "negative" in err
    assert not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize("target", [None, " "])
def test_missing_or_empty_target_is_one_line_exit_2(capsys, tmp_path, target):
    """The pool is the frozen model's samples of --target, and the engine refuses an empty prompt:
    refused before any model loads, not after."""
    flags = [] if target is None else ["--target", target]
    code, out, err = run_cli(capsys, "train", "slider", "--model", MODEL, "--positive", "large", "--negative",
                             "small", *flags, "--out", str(tmp_path / "s.safetensors"))
    # argparse answers a missing required flag with its usage, then the one line naming the flag.
    assert code == 2 and "--target" in err.strip().splitlines()[-1], err
    assert target is None or err.count("\n") == 1, err
    assert not (tmp_path / "s.safetensors").exists()
