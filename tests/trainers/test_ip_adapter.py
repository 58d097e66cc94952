"""`sdserve train ip-adapter` (issue 19): image projection and to_k_ip/to_v_ip trained by the shared
loop over a frozen image encoder built here; the directory serves in sdserve (a request's
IP-Adapter image) and in diffusers (`load_ip_adapter` + `ip_adapter_image`) with the same image
(<= 2/255); resume is exact; bad input is one line, exit 2."""

from __future__ import annotations

import dataclasses
import json
import math

import diffusers
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image

from sdserve.api.types import IPAdapterSpec
from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.schedulers import make_scheduler, resolve_scheduler
from sdserve.models.builtin import builtin_path
from sdserve.trainers.data import load_folder
from sdserve.trainers.ip_adapter import WEIGHTS_FILE, train_ip_adapter
from sdserve.trainers.ip_adapter_encoder import EncoderConfig, build_encoder
from sdserve.trainers.loop import LoopConfig
from tests.engine.oracle import max_pixel_difference
from tests.engine.test_image_inputs import png
from tests.trainers.conftest import fresh, run_cli, write_folder

MODEL = "tiny-sd1"
SIDE = 32
LOOP = LoopConfig(steps=2, lr=0.05, batch_size=2, seed=3, progress=False, resolution=SIDE)
TINY_ENCODER = EncoderConfig(projection_dim=16, steps=3, batch_size=8, pool=16, held_out=8)
REQUEST = dict(model=MODEL, prompt="a photo of a box", seed=11, steps=4, guidance_scale=6.0,
               negative_prompt="blurry", scheduler="euler", width=SIDE, height=SIDE)


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(TINY_ENCODER, seed=1)[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _bases, encoder):
    work = tmp_path_factory.mktemp("ip_adapter")
    data = load_folder(write_folder(work / "data", count=3, size=(SIDE, SIDE)), SIDE)
    components = fresh(_bases, MODEL)
    result = train_ip_adapter(components, data, encoder, LOOP, work / "ip")
    return work, data, components, result


def test_training_changes_the_weights_finite_loss_and_layout(trained, encoder):
    work, _, components, result = trained
    assert len(result.losses) == 2 and all(math.isfinite(loss) for loss in result.losses)
    tensors = safetensors.torch.load_file(work / "ip" / WEIGHTS_FILE)
    cross = [name.removesuffix(".processor") for name in components.unet.attn_processors
             if name.endswith("attn2.processor")]
    expected = {f"ip_adapter.{2 * i + 1}.{kind}.weight" for i in range(len(cross)) for kind in ("to_k_ip", "to_v_ip")}
    assert set(tensors) == expected | {f"image_proj.{p}.{w}" for p in ("proj", "norm") for w in ("weight", "bias")}
    assert tensors["image_proj.proj.weight"].shape == (4 * components.unet.config.cross_attention_dim, 16)
    # to_k_ip/to_v_ip start as the layer's to_k/to_v (the paper's initialisation): training moved them.
    for index, layer in enumerate(cross):
        attn = components.unet.get_submodule(layer)
        for kind, source in (("to_k_ip", attn.to_k), ("to_v_ip", attn.to_v)):
            trained_weight = tensors[f"ip_adapter.{2 * index + 1}.{kind}.weight"]
            assert trained_weight.shape == source.weight.shape
            assert (trained_weight - source.weight).abs().max() > 1e-3
    # The UNet's own processors are back after training.
    assert not any(type(p).__name__ == "_BranchProcessor" for p in components.unet.attn_processors.values())
    with safetensors.safe_open(work / "ip" / WEIGHTS_FILE, "pt") as handle:
        header = handle.metadata()
    assert header["sdserve_method"] == "ip_adapter" and header["sdserve_steps"] == "2"
    assert header["sdserve_base_model_sha256"] == components.digest and header["sdserve_image_embed_dim"] == "16"
    assert json.loads((work / "ip" / "sdserve.json").read_text())["training"]["sdserve_method"] == "ip_adapter"
    assert (work / "ip" / "image_encoder" / "config.json").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["data", "ip", "ip.state"]  # no staging left behind


def test_served_image_equals_diffusers_ip_adapter_pipeline(trained):
    work = trained[0]
    reference = Image.open(work / "data" / "img1.png").convert("RGB")
    engine = Engine(EngineConfig(device="cpu", dtype="float32"))
    unit = IPAdapterSpec(model=str(work / "ip"), image=png(reference), scale=1.0)
    ours = engine.generate([engine.validate(RequestSpec(**REQUEST, ip_adapters=(unit,)))])[0].images[0]
    plain = engine.generate([engine.validate(RequestSpec(**REQUEST))])[0].images[0]
    assert max_pixel_difference(ours, plain) > 10  # the adapter moves the image, or equality proves nothing

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(builtin_path(MODEL))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(resolve_scheduler(REQUEST["scheduler"]), dict(pipe.scheduler.config))
    pipe.load_ip_adapter(str(work / "ip"), subfolder="", weight_name=WEIGHTS_FILE, image_encoder_folder="image_encoder")
    pipe.set_ip_adapter_scale(1.0)
    theirs = pipe(REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"], ip_adapter_image=reference,
                  num_inference_steps=REQUEST["steps"], guidance_scale=REQUEST["guidance_scale"], width=SIDE,
                  height=SIDE, generator=torch.Generator("cpu").manual_seed(REQUEST["seed"]), output_type="np").images[0]
    assert max_pixel_difference(ours, (theirs * 255).round().astype(np.uint8)) <= 2


def test_resume_continues_exactly(trained, components_of, encoder, tmp_path):
    work, data, _, first = trained  # 2 steps, checkpoint in ip.state
    cfg = dataclasses.replace(LOOP, steps=3)
    straight = train_ip_adapter(components_of(MODEL), data, encoder, cfg, tmp_path / "straight")
    resumed = train_ip_adapter(components_of(MODEL), data, encoder, dataclasses.replace(cfg, resume=first.state_dir),
                               tmp_path / "resumed")
    assert straight.losses[:2] == first.losses and resumed.losses == straight.losses[2:]
    assert (tmp_path / "resumed" / WEIGHTS_FILE).read_bytes() == (tmp_path / "straight" / WEIGHTS_FILE).read_bytes()


def test_caption_and_image_dropout_follow_the_rate():
    from sdserve.trainers.ip_adapter import IPAdapterMethod

    method = IPAdapterMethod.__new__(IPAdapterMethod)  # only drops(): no model needed
    method.seed, method.config = 0, type("C", (), {"dropout": 0.05})()
    text, image = [], []
    for step in range(400):
        t, i = method.drops(list(range(8)), torch.full((8,), step))
        text += t
        image += i
    text, image = np.array(text), np.array(image)
    # Each of caption only, image only, both: 5 % of 3200 rows = 160 (binomial sd ~12).
    for share in ((text & ~image).mean(), (image & ~text).mean(), (text & image).mean()):
        assert 0.035 < share < 0.065
    assert method.drops([1, 2], torch.tensor([5, 6])) == method.drops([1, 2], torch.tensor([5, 6]))


def _refused(capsys, *args: str) -> str:
    code, _, stderr = run_cli(capsys, "train", "ip-adapter", "--model", MODEL, "--no-progress",
                              "--resolution", str(SIDE), *args)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("sdserve: error: "), stderr
    return lines[0]


def test_bad_input_is_one_line_exit_2(capsys, trained, encoder, tmp_path):
    work = trained[0]
    out = ["--out", str(tmp_path / "ip"), "--steps", "3"]
    broken = write_folder(tmp_path / "broken", count=2, size=(SIDE, SIDE))
    (broken / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert "img1.png" in _refused(capsys, "--data", str(broken), *out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "--data" in _refused(capsys, "--data", str(empty), *out)
    good = str(work / "data")
    not_clip = tmp_path / "not_clip"
    not_clip.mkdir()
    (not_clip / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    assert "CLIPVisionModelWithProjection" in _refused(capsys, "--data", good, *out, "--image-encoder", str(not_clip))
    # An encoder of another width (embedding 32) cannot continue a checkpoint trained over one of 16.
    wide = tmp_path / "wide"
    build_encoder(dataclasses.replace(TINY_ENCODER, projection_dim=32, steps=0), seed=1)[0].save_pretrained(wide)
    line = _refused(capsys, "--data", good, *out, "--image-encoder", str(wide), "--resume", str(work / "ip.state"))
    assert "--resume" in line and "image_embed_dim '16'" in line and "'32'" in line
    assert not (tmp_path / "ip").exists()


def test_cli_builds_the_encoder_saves_it_for_resume(capsys, trained, tmp_path):
    good, out = str(trained[0] / "data"), tmp_path / "ip"
    common = ("train", "ip-adapter", "--model", MODEL, "--no-progress", "--resolution", str(SIDE), "--data", good,
              "--out", str(out), "--encoder-steps", "0", "--batch-size", "2")
    code, stdout, stderr = run_cli(capsys, *common, "--steps", "1")
    assert code == 0, stderr
    assert "wrote" in stdout and (out / WEIGHTS_FILE).is_file()
    saved = tmp_path / "ip.state" / "image_encoder" / "model.safetensors"
    assert saved.read_bytes() == (out / "image_encoder" / "model.safetensors").read_bytes()
    # --resume without --image-encoder takes the encoder the first run saved in the state dir.
    code, _, stderr = run_cli(capsys, *common, "--steps", "2", "--resume", str(tmp_path / "ip.state"))
    assert code == 0, stderr
    with safetensors.safe_open(out / WEIGHTS_FILE, "pt") as handle:
        assert handle.metadata()["sdserve_steps"] == "2"
