"""`sdserve train dreambooth`: the full fine-tune writes a pipeline directory that diffusers and
sdserve load, --lora a LoRA file; class images are generated once by the engine and reused;
bad input is one line, exit 2, with nothing written."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import safetensors
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from sdserve.adapters import load_lora, targets_of
from sdserve.models.builtin import builtin_path
from sdserve.trainers.components import load_components
from sdserve.trainers.dreambooth import (
    DreamBoothConfig,
    class_seed,
    default_class_dir,
    ensure_class_images,
    train_dreambooth,
)
from sdserve.trainers.loop import LoopConfig
from sdserve.trainers.lora import LoRAConfig
from tests.trainers.conftest import run_cli, write_folder

LOOP = LoopConfig(steps=2, lr=1e-3, progress=False)
INSTANCE, CLASS = "a photo of sks dog", "a photo of dog"


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    return run_cli(capsys, "train", "dreambooth", "--no-progress", *args)


def _differing(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> int:
    assert ours.keys() == theirs.keys()
    return sum(not torch.equal(ours[k], theirs[k]) for k in ours)


def test_full_fine_tune_writes_a_pipeline_diffusers_and_sdserve_load(tmp_path):
    from sdserve.engine import Engine, EngineConfig, RequestSpec

    data = write_folder(tmp_path / "data", count=2)
    out = tmp_path / "dog"
    config = DreamBoothConfig(model="tiny-sd1", data=data, out=out, instance_prompt=INSTANCE,
                              class_prompt=CLASS, num_class_images=2, text_encoder=True)
    result = train_dreambooth(config, LOOP)
    assert result.out == out and len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert result.metadata["sdserve_reg_images"] == "2" and result.metadata["sdserve_method"] == "dreambooth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "dog", "dog.class", "dog.state"]  # no staging left

    base = load_components("tiny-sd1")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert _differing(pipe.unet.state_dict(), base.unet.state_dict()) > 100  # every weight trained
    assert _differing(pipe.text_encoder.state_dict(), base.text_encoders[0].state_dict()) > 10
    assert _differing(pipe.vae.state_dict(), base.vae.state_dict()) == 0
    with safetensors.safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as handle:
        assert handle.metadata()["sdserve_instance_prompt"] == INSTANCE

    engine = Engine(EngineConfig(device="cpu", dtype="float32"))
    common = dict(prompt=INSTANCE, seed=5, steps=3)
    trained, plain = engine.generate([engine.validate(RequestSpec(model=str(out), **common)),
                                      engine.validate(RequestSpec(model="tiny-sd1", **common))])
    assert engine.model_info(str(out)).family == "sd1"
    assert np.abs(trained.images[0].astype(int) - plain.images[0].astype(int)).max() > 0


def test_resumed_full_run_equals_the_uninterrupted_one_and_replaces_its_output(tmp_path):
    """A 1-step run resumed to 2 steps gives the 2-step run's UNet bytes, written over the
    1-step pipeline at the same --out (a pipeline this trainer wrote may be replaced)."""
    data = write_folder(tmp_path / "data", count=2)
    straight = DreamBoothConfig(model="tiny-sd1", data=data, out=tmp_path / "a", instance_prompt=INSTANCE)
    train_dreambooth(straight, LOOP)
    split = dataclasses.replace(straight, out=tmp_path / "b")
    train_dreambooth(split, dataclasses.replace(LOOP, steps=1))
    train_dreambooth(split, dataclasses.replace(LOOP, resume=tmp_path / "b.state"))
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (tmp_path / "b" / weights).read_bytes()


def test_class_images_are_generated_once_and_reused(tmp_path, monkeypatch):
    folder = tmp_path / "class"
    assert ensure_class_images(folder, CLASS, 2, "tiny-sd1", 32, seed=7, progress=False) == 2
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(first) == ["class-00000.png", "class-00001.png"]
    parameters = Image.open(folder / "class-00001.png").text["parameters"]
    assert CLASS in parameters and f"Seed: {class_seed(7, 1)}" in parameters
    assert class_seed(7, 0) != class_seed(7, 1)

    # Enough cached: no engine at all. One more wanted: only that one is made.
    import sdserve.engine

    monkeypatch.setattr(sdserve.engine, "Engine", None)
    assert ensure_class_images(folder, CLASS, 2, "tiny-sd1", 32, seed=7, progress=False) == 0
    monkeypatch.undo()
    assert ensure_class_images(folder, CLASS, 3, "tiny-sd1", 32, seed=7, progress=False) == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in first} == first
    assert len(list(folder.iterdir())) == 3

    # A training run reuses the cache (the engine is never built) and trains on the first N.
    data = write_folder(tmp_path / "data", count=1)
    monkeypatch.setattr(sdserve.engine, "Engine", None)
    config = DreamBoothConfig(model="tiny-sd1", data=data, out=tmp_path / "dog.safetensors",
                              instance_prompt=INSTANCE, class_prompt=CLASS, num_class_images=2,
                              class_dir=folder, lora=LoRAConfig(rank=2))
    result = train_dreambooth(config, dataclasses.replace(LOOP, steps=1))
    assert result.metadata["sdserve_reg_images"] == "2"
    assert not default_class_dir(config.out).exists()


def test_lora_mode_writes_a_lora_file_that_loads(tmp_path, capsys):
    data = write_folder(tmp_path / "data", count=2)
    masks = write_folder(tmp_path / "masks", count=2, seed=3)  # random pixels: masks of mixed weights
    out = tmp_path / "dog.safetensors"
    code, stdout, stderr = _cli(capsys, "--model", "tiny-sd1", "--data", str(data), "--out", str(out),
                                "--instance-prompt", INSTANCE, "--lora", "--rank", "2", "--alpha", "1",
                                "--targets", "attn,ff", "--text-encoder", "--steps", "2", "--lr", "1e-3",
                                "--mask-data", str(masks))
    assert code == 0, stderr
    assert stdout.startswith(f"wrote LoRA {out} (2 steps, last loss ")
    adapter = load_lora(out, "dog", targets_of(load_components("tiny-sd1").adapter_components()))
    assert adapter.max_rank == 2 and "text_encoder" in adapter.components
    assert any(target.endswith(".ff.net.2") for target in adapter.modules)  # --targets reached the LoRA
    assert all(module.scale == 0.5 for module in adapter.modules.values())
    assert max(float(module.b.abs().max()) for module in adapter.modules.values()) > 0  # B trained from 0
    with safetensors.safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["sdserve_method"] == "dreambooth_lora" and metadata["sdserve_instance_prompt"] == INSTANCE
    assert metadata["sdserve_masked_loss"] == "true"
    pipe = StableDiffusionPipeline.from_pretrained(builtin_path("tiny-sd1"))
    pipe.load_lora_weights(str(out))  # diffusers reads it too


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ([], "--instance-prompt"),
        (["--instance-prompt", INSTANCE, "--use-captions"], "--instance-prompt"),
        (["--instance-prompt", INSTANCE, "--num-class-images", "4"], "--num-class-images"),
        (["--instance-prompt", INSTANCE, "--class-prompt", CLASS, "--num-class-images", "0"], "--num-class-images"),
        (["--instance-prompt", INSTANCE, "--rank", "4"], "--rank"),
        (["--instance-prompt", INSTANCE, "--targets", "attn,ff"], "--targets"),
        (["--instance-prompt", INSTANCE, "--lora", "--targets", "attn,nope"], "--targets"),
        (["--instance-prompt", INSTANCE, "--lora", "--rank", "0"], "--rank"),
        (["--instance-prompt", INSTANCE, "--steps", "-1"], "--steps"),
        (["--instance-prompt", INSTANCE, "--resolution", "30"], "--resolution"),
        (["--instance-prompt", INSTANCE, "--model", "no-such-model"], "--model"),
        (["--instance-prompt", INSTANCE, "--mask-data", "/no/such/dir"], "--mask-data"),
    ],
)
def test_bad_flags_are_one_line_exit_2(capsys, tmp_path, flags, named):
    data = write_folder(tmp_path / "data", count=1)
    code, stdout, stderr = _cli(capsys, "--model", "tiny-sd1", "--data", str(data), "--out", str(tmp_path / "o"),
                                *flags)
    lines = stderr.strip().splitlines()
    assert code == 2 and stdout == "" and len(lines) == 1 and lines[0].startswith("sdserve: error: "), stderr
    assert named in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written


def test_unusable_outputs_are_one_line_exit_2(capsys, tmp_path):
    data = write_folder(tmp_path / "data", count=1)
    (tmp_path / "file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    outs = [tmp_path / "file" / "o", tmp_path / "missing" / "o", tmp_path / "file", tmp_path / "mine"]
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "locked").mkdir(mode=0o500)
        outs.append(tmp_path / "locked" / "o")
    for out in outs:
        code, _, stderr = _cli(capsys, "--model", "tiny-sd1", "--data", str(data), "--out", str(out),
                               "--instance-prompt", INSTANCE)
        assert code == 2 and len(stderr.strip().splitlines()) == 1 and "--out" in stderr, (out, stderr)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", "file", "mine", *(
        ["locked"] if os.geteuid() != 0 else [])])
    code, _, stderr = _cli(capsys, "--model", "tiny-sd1", "--data", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o"), "--instance-prompt", INSTANCE)
    assert code == 2 and "--data" in stderr
