"""`sdserve client ...` against a live server: generate (every request flag of `sdserve generate`,
--requests, --stream with previews), adapters upload/list/get/delete, models."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from sdserve.cli.main import main
from tests.server.conftest import (
    KEYS,
    MODEL,
    ServerThread,
    make_config,
    max_diff,
    png_pixels,
    reference_images,
    sha,
)
from tests.server.test_adapter_listing import as_slider


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    from tests.engine.test_controlnet import make_controlnet

    return make_controlnet(MODEL, tmp_path_factory.mktemp("cn"), 1)


@pytest.fixture(scope="module")
def server(tmp_path_factory, controlnet_dir):
    """This module's server also serves a ControlNet, registered as "edges"."""
    config = make_config(tmp_path_factory.mktemp("registry"))
    config = replace(config, models=replace(config.models, controlnets={"edges": str(controlnet_dir)}))
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def _run(server, *argv: str, key: str = "alice") -> None:
    main(["client", "--target", server.target, "--api-key", KEYS[key], "--timeout", "60", *argv])


def test_generate_writes_the_engines_png(server, reference_engine, tmp_path, capsys):
    out = tmp_path / "out.png"
    _run(server, "generate", "--model", MODEL, "--prompt", "a red circle", "--seed", "4", "--steps", "3",
         "--guidance", "6", "--out", str(out), "--stream", "--preview-dir", str(tmp_path / "previews"))
    captured = capsys.readouterr()
    assert f"{out}  seed=4" in captured.out and "] step 3/3" in captured.err and "2 preview(s)" in captured.err
    # --preview-dir asks for a preview every step but the last (the result is the last image)
    previews = sorted((tmp_path / "previews").iterdir())
    assert [p.name for p in previews] == ["step_001.png", "step_002.png"]
    final = png_pixels(out.read_bytes())
    for preview in map(png_pixels, (p.read_bytes() for p in previews)):
        assert preview.shape[0] < final.shape[0] and preview.shape[2] == 3 and preview.std() > 0
    want = reference_images(reference_engine, {"model": MODEL, "prompt": "a red circle", "seed": 4, "steps": 3,
                                               "guidance_scale": 6.0})[0]
    assert max_diff(png_pixels(out.read_bytes()), want) <= 2


def test_adapter_commands(server, lora_bytes, tmp_path, capsys):
    path = tmp_path / "style.safetensors"
    path.write_bytes(lora_bytes["sd1_a"])
    _run(server, "adapters", "upload", str(path), "--name", "cli-style", "--family", "sd1", key="bob")
    assert json.loads(capsys.readouterr().out)["sha256"] == sha(lora_bytes["sd1_a"])
    slider = tmp_path / "size.safetensors"
    slider.write_bytes(as_slider(lora_bytes["sd1_b"], tmp_path,
                                 {"sdserve_slider_scale_range": "-1,1", "sdserve_slider_start": "0.25"}))
    _run(server, "adapters", "upload", str(slider), "--name", "cli-size", "--family", "sd1", key="bob")
    capsys.readouterr()
    _run(server, "adapters", "list", key="bob")
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "FAMILY", "KIND", "FORM", "RANK", "TARGETS", "SCALES", "START", "SCOPE", "BYTES",
                              "SHA256"]
    listed = {line.split()[0]: line.split() for line in lines}
    name, family, kind, form, rank, targets, scales, start, scope, size, digest = listed["cli-style"]
    assert (family, kind, form, scales, start, scope, digest) == (
        "sd1", "lora", "lora", "-", "-", "own", sha(lora_bytes["sd1_a"]))
    assert int(rank) > 0 and int(targets) > 0 and int(size) == len(lora_bytes["sd1_a"])
    assert listed["cli-size"][6:8] == ["-1,1", "0.25"]
    _run(server, "adapters", "delete", "cli-size", key="bob")
    assert "deleted cli-size" in capsys.readouterr().out
    _run(server, "adapters", "get", "cli-style", key="bob")
    assert json.loads(capsys.readouterr().out)["name"] == "cli-style"
    with pytest.raises(SystemExit) as info:
        _run(server, "adapters", "get", "cli-style", key="alice")
    assert info.value.code == 2 and "NOT_FOUND: name: no adapter named 'cli-style'" in capsys.readouterr().err
    _run(server, "adapters", "delete", "cli-style", key="bob")
    assert "deleted cli-style" in capsys.readouterr().out


def test_models_and_errors(server, capsys):
    _run(server, "models")
    assert json.loads(capsys.readouterr().out)["models"][0]["name"] == MODEL
    with pytest.raises(SystemExit) as info:
        main(["client", "--target", server.target, "--api-key", "nope", "models"])
    assert info.value.code == 1 and "UNAUTHENTICATED" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        _run(server, "generate", "--prompt", "x", "--width", "33", "--out", "x.png")
    assert info.value.code == 2 and "INVALID_ARGUMENT: width:" in capsys.readouterr().err


def _png(path, array: np.ndarray):
    Image.fromarray(array).save(path)
    return path


def test_generate_flags_match_the_in_process_command(server, controlnet_dir, tmp_path, capsys):
    """init image + mask + ControlNet + embedding: `client generate` (registered names) gives
    `sdserve generate`'s image (files) for the same flags."""
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:] = (40, 120, 200)
    pixels[8:16, 8:24] = (250, 200, 20)
    init = _png(tmp_path / "init.png", pixels)
    mask_pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    mask_pixels[:, 16:] = 255
    mask = _png(tmp_path / "mask.png", mask_pixels)
    control = _png(tmp_path / "edges.png", np.where(pixels > 128, 255, 0).astype(np.uint8))
    embedding = tmp_path / "cat-toy.safetensors"
    safetensors.torch.save_file({"<cat-toy>": torch.randn(3, 32, generator=torch.Generator().manual_seed(1))},
                                str(embedding))
    _run(server, "adapters", "upload", str(embedding), "--name", "cli-ti", "--family", "sd1", "--kind", "embedding")
    capsys.readouterr()
    common = ["--model", MODEL, "--prompt", "a <cat-toy> house", "--seed", "3", "--steps", "4", "--guidance", "5",
              "--init-image", str(init), "--mask", str(mask), "--strength", "0.9"]
    remote, local = tmp_path / "remote.png", tmp_path / "local.png"
    _run(server, "generate", *common, "--controlnet", f"edges:{control}:0.8", "--embedding", "cli-ti",
         "--out", str(remote))
    assert main(["generate", *common, "--controlnet", f"{controlnet_dir}:{control}:0.8", "--embedding",
                 str(embedding), "--out", str(local), "--quiet"]) == 0
    got, want = png_pixels(remote.read_bytes()), png_pixels(local.read_bytes())
    assert max_diff(got, want) <= 2
    # Each input mattered: without the unit and the embedding the image is another one.
    bare = tmp_path / "bare.png"
    _run(server, "generate", *common, "--out", str(bare))
    assert max_diff(png_pixels(bare.read_bytes()), want) > 2


def test_requests_file_writes_each_response_in_order(server, reference_engine, tmp_path, capsys):
    lines = [{"model": MODEL, "prompt": "a red circle", "seed": 7, "steps": 2},
             {"prompt": "a blue square", "seed": 8, "steps": 3, "guidance_scale": 4.0}]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    _run(server, "generate", "--requests", str(requests), "--out-dir", str(tmp_path / "out"), "--model", MODEL)
    assert "2 request(s) done" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0000.png", "0001.png"]
    want = reference_images(reference_engine, {**lines[1], "model": MODEL})[0]  # the line --model filled
    assert max_diff(png_pixels((tmp_path / "out" / "0001.png").read_bytes()), want) <= 2
    requests.write_text(json.dumps({"prompt": "x", "steps": "many"}) + "\n")
    with pytest.raises(SystemExit) as info:
        _run(server, "generate", "--requests", str(requests), "--out-dir", str(tmp_path / "bad"))
    assert info.value.code == 2 and "requests.jsonl line 1: steps: must be an integer" in capsys.readouterr().err


def test_generate_format_jpeg_carries_the_pngs_parameters(server, tmp_path, capsys):
    """--format/--quality as `sdserve generate` takes them: the server's PNG re-encoded, its
    A1111 parameters text moved into EXIF UserComment; a bad --quality is refused before sending."""
    from sdserve.cli.image_output import read_user_comment

    flags = ["generate", "--model", MODEL, "--prompt", "a red circle", "--seed", "9", "--steps", "2"]
    png, jpeg = tmp_path / "a.png", tmp_path / "a.jpg"
    _run(server, *flags, "--out", str(png))
    _run(server, *flags, "--out", str(jpeg), "--format", "jpeg", "--quality", "100")
    with Image.open(png) as image:
        parameters = image.info["parameters"]
    with Image.open(jpeg) as image:
        assert image.format == "JPEG"
        comment = image.getexif().get_ifd(0x8769)[0x9286]
        pixels = np.asarray(image.convert("RGB"))
    assert "Seed: 9" in parameters and read_user_comment(comment) == parameters
    assert max_diff(pixels, png_pixels(png.read_bytes())) <= 4  # JPEG at quality 100, 4:4:4: measured 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        _run(server, *flags, "--out", str(tmp_path / "b.png"), "--quality", "50")
    assert info.value.code == 2 and "--quality: only with --format jpeg or webp" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()
