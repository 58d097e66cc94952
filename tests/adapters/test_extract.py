"""`sdserve adapters extract`: a LoRA from the difference between a fine-tuned model and its base.

The tuned model is tiny-sd1 with known low-rank deltas added to a few modules (a linear, a 3x3
conv, a 1x1 conv, a feed-forward projection, a text-encoder projection), so the oracle is the
delta itself: extracted at its rank, the LoRA's B·A must equal it, and the base model with the
file loaded (in diffusers, and in sdserve's engine) must compute what the tuned model does.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from sdserve.adapters import load_lora, targets_of
from sdserve.adapters.extract import ExtractConfig, extract_lora
from sdserve.errors import InvalidArgument
from sdserve.models.builtin import builtin_path
from tests.adapters.lora_factory import tiny_unet
from tests.cli.test_cli import sdserve_in_process
from tests.engine.oracle import max_pixel_difference

# Target endings that the tuned model changes, each by a random rank-2 delta.
CHANGED = (
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",  # linear
    "unet.down_blocks.0.resnets.0.conv1",  # 3x3 conv
    "unet.down_blocks.1.attentions.0.proj_in",  # 1x1 conv
    "unet.up_blocks.0.attentions.2.transformer_blocks.0.ff.net.0.proj",  # linear, 512 x 64
    "layers.1.mlp.fc1",  # the text encoder's, with or without "text_model."
    "layers.0.self_attn.out_proj",
    "layers.0.self_attn.q_proj",
)
# diffusers 0.42 reads a kohya file's text-encoder keys right only when one is an out_proj's: it
# types the file by that key, and without it drops q/k/v_proj (only q_proj: an error). A real
# fine-tune changes every projection; the tuned model here changes out_proj too for that reason.


def _components(path: Path) -> dict[str, torch.nn.Module]:
    return {
        "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval(),
    }


def _low_rank(shape: torch.Size, rank: int, generator: torch.Generator) -> torch.Tensor:
    """A random delta of exactly `rank` in `shape` (a conv's flattened to [out, in·kh·kw])."""
    out, columns = shape[0], int(np.prod(shape[1:]))
    up = torch.randn(out, rank, generator=generator) * 0.1  # [out, r]
    down = torch.randn(rank, columns, generator=generator) * 0.1  # [r, cols]
    return (up @ down).reshape(shape)


def _add_deltas(components, endings, rank: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    targets = targets_of(components)
    for ending in endings:
        target = next(t for t in targets if t.endswith(ending))
        component, _, path = target.partition(".")
        weight = components[component].get_submodule(path).weight
        deltas[target] = _low_rank(weight.shape, rank, generator)
        with torch.no_grad():
            weight += deltas[target]
    return deltas


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(base dir, tuned dir, target -> the delta the tuned model adds)."""
    base = builtin_path("tiny-sd1")
    tuned = tmp_path_factory.mktemp("extract") / "tuned"
    shutil.copytree(base, tuned)
    components = _components(base)
    deltas = _add_deltas(components, CHANGED, rank=2, seed=0)
    for name, model in components.items():
        model.save_pretrained(tuned / name)
    return base, tuned, deltas


def _run_extract(capsys, base, tuned, out: Path, *extra: str) -> tuple[int, str, str]:
    return sdserve_in_process(capsys, "adapters", "extract", "--base", str(base), "--tuned", str(tuned),
                              "--out", str(out), "--no-progress", *extra)


def test_rank_2_deltas_are_reproduced(models, tmp_path, capsys):
    base, tuned, deltas = models
    out = tmp_path / "x.safetensors"
    code, stdout, stderr = _run_extract(capsys, base, tuned, out, "--rank", "2", "--text-encoder",
                                        "--report", str(tmp_path / "r.json"))
    assert code == 0, stderr
    targets = targets_of(_components(base))
    adapter = load_lora(out, "x", targets)
    assert set(adapter.modules) == set(deltas)
    for target, delta in deltas.items():
        torch.testing.assert_close(adapter.modules[target].delta_weight(), delta, rtol=0, atol=1e-5)
        assert adapter.modules[target].scale == 1.0

    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["modules"]) == len(deltas)
    assert len(report["skipped"]) == len(targets) - len(deltas)
    assert report["max_relative_error"] < 1e-5
    assert f"extracted {len(deltas)} modules" in stdout and f"skipped {len(targets) - len(deltas)}" in stdout


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_file_in_diffusers_computes_the_tuned_model(models, tmp_path, capsys, layout):
    base, tuned, _ = models
    out = tmp_path / "x.safetensors"
    code, _, stderr = _run_extract(capsys, base, tuned, out, "--rank", "2", "--text-encoder", "--format", layout)
    assert code == 0, stderr
    pipe = StableDiffusionPipeline.from_pretrained(base)
    plain_unet = copy.deepcopy(pipe.unet)
    pipe.load_lora_weights(str(out))
    theirs = _components(tuned)

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)  # [B, C, h, w]
    tokens = torch.randint(0, 40, (2, 77), generator=generator)  # [B, T]
    timesteps = torch.tensor([10, 700])
    with torch.no_grad():
        states = theirs["text_encoder"](tokens)[0]  # [B, T, 32]
        torch.testing.assert_close(pipe.text_encoder(tokens)[0], states, rtol=1e-4, atol=1e-5)
        expected = theirs["unet"](latents, timesteps, states).sample  # [B, 4, h, w]
        ours = pipe.unet(latents, timesteps, states).sample
        plain = plain_unet(latents, timesteps, states).sample
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert (plain - expected).abs().max() > 1e-2  # the deltas matter, or this proves nothing


def test_engine_serves_base_plus_file_as_the_tuned_model(models, tmp_path, capsys):
    from sdserve.engine import Engine, EngineConfig, RequestSpec
    from sdserve.engine.request import AdapterSpec

    base, tuned, _ = models
    out = tmp_path / "x.safetensors"
    code, _, stderr = _run_extract(capsys, base, tuned, out, "--rank", "2", "--text-encoder")
    assert code == 0, stderr
    engine = Engine(EngineConfig(device="cpu", dtype="float32"))
    common = dict(prompt="a red circle", seed=3, steps=3, guidance_scale=5.0, scheduler="euler")
    specs = [
        RequestSpec(model="tiny-sd1", adapters=(AdapterSpec(path=str(out)),), **common),
        RequestSpec(model=str(tuned), **common),
        RequestSpec(model="tiny-sd1", **common),
    ]
    with_lora, tuned_images, plain = (np.stack(o.images) for o in engine.generate([engine.validate(s) for s in specs]))
    assert max_pixel_difference(with_lora, tuned_images) <= 1
    assert max_pixel_difference(plain, tuned_images) > 10


def test_truncation_error_is_what_the_dropped_singular_values_hold(models):
    """Rank 2 of a rank-4 delta: the reported error and the file's error both equal the closed
    form; a changed bias and an unextracted text encoder are reported."""
    base_dir, _, _ = models
    base = _components(base_dir)
    tuned = copy.deepcopy(base)
    deltas = _add_deltas(tuned, CHANGED[:2], rank=4, seed=1)
    _add_deltas(tuned, CHANGED[-1:], rank=2, seed=2)
    conv = next(t for t in deltas if t.endswith("conv1"))
    with torch.no_grad():
        tuned["unet"].get_submodule(conv.partition(".")[2]).bias += 0.5

    extraction = extract_lora(base, tuned, ExtractConfig(rank=2))
    assert {e.target for e in extraction.errors} == set(deltas)
    for error in extraction.errors:
        delta = deltas[error.target].reshape(len(deltas[error.target]), -1).double()  # [out, cols]
        singular = torch.linalg.svdvals(delta)
        closed_form = float(singular[2:].square().sum().sqrt() / singular.square().sum().sqrt())
        assert error.relative_error == pytest.approx(closed_form, rel=1e-4)
        assert closed_form > 0.1  # a real truncation
        lora = extraction.adapter.modules[error.target].delta_weight().reshape(delta.shape).double()
        assert float((delta - lora).norm() / delta.norm()) == pytest.approx(closed_form, rel=1e-4)
    assert extraction.changed_biases == (conv,)
    assert extraction.changed_elsewhere == ("text_encoder",)
    assert extraction.max_error == max(e.relative_error for e in extraction.errors)


def test_rank_is_capped_by_the_module(models):
    """A module narrower than --rank keeps its full rank: the LoRA is then exact."""
    base_dir, _, _ = models
    base = _components(base_dir)
    tuned = copy.deepcopy(base)
    deltas = _add_deltas(tuned, CHANGED[-1:], rank=32, seed=4)  # a 32 x 32 projection at full rank
    extraction = extract_lora(base, tuned, ExtractConfig(rank=100, text_encoder=True))
    (target,) = deltas
    assert extraction.adapter.modules[target].rank == 32
    torch.testing.assert_close(extraction.adapter.modules[target].delta_weight(), deltas[target], rtol=0, atol=1e-5)


def test_different_architectures_are_refused(models, tmp_path, capsys):
    base_dir, _, _ = models
    code, stdout, stderr = _run_extract(capsys, "tiny-sd1", "tiny-sd2", tmp_path / "x.safetensors", "--rank", "2")
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and "tiny-sd1" in stderr and "tiny-sd2" in stderr
    assert not (tmp_path / "x.safetensors").exists()

    # Same family, other shapes: the module-by-module check names both models and the module.
    base = _components(base_dir)
    other = {**base, "unet": tiny_unet()}
    with pytest.raises(InvalidArgument, match=r"--base mine and --tuned theirs are different architectures"):
        extract_lora(base, other, ExtractConfig(rank=2), base_name="mine", tuned_name="theirs")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rank", "0"], "--rank"),
        (["--rank", "2", "--min-delta", "nan"], "--min-delta"),
        (["--rank", "2", "--tuned-is-base"], "does not differ"),
        (["--rank", "2", "--existing"], "exists; pass --force"),
        (["--rank", "2", "--no-such-base"], "--base"),
    ],
)
def test_bad_input_is_one_line_exit_2(models, tmp_path, capsys, flags, message):
    base, tuned, _ = models
    out = tmp_path / "x.safetensors"
    if "--tuned-is-base" in flags:
        tuned = base
    if "--existing" in flags:
        out.write_bytes(b"keep")
    if "--no-such-base" in flags:
        base = tmp_path / "nothing"
    flags = [f for f in flags if f not in ("--tuned-is-base", "--existing", "--no-such-base")]
    code, stdout, stderr = _run_extract(capsys, base, tuned, out, *flags)
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and message in stderr
    assert out.read_bytes() == b"keep" if "exists" in message else not out.exists()
