"""CLI smoke tests: the commands the README shows, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdserve.engine import Engine, EngineConfig, RequestSpec
from tests.engine.oracle import max_pixel_difference


def sdserve_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (fast: no second torch import); -> (exit code, stdout, stderr)."""
    from sdserve.cli.main import main

    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sdserve(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "sdserve.cli.main", *args], capture_output=True, text=True, env=env, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr}")
    return proc


def test_models_list_and_path(capsys):
    listing = sdserve_in_process(capsys, "models", "list")[1]
    for name in ("default", "tiny-sd1", "tiny-sd2", "tiny-sdxl"):
        assert name in listing
    path = Path(sdserve_in_process(capsys, "models", "path", "tiny-sd1")[1].strip())
    assert (path / "model_index.json").is_file()
    assert Path(sdserve("models", "path").stdout.strip()).name.startswith("default")  # the real entry point


def test_generate_writes_png_with_parameters_equal_to_engine(tmp_path):
    out = tmp_path / "x.png"
    sdserve(
        "generate", "--model", "tiny-sd1", "--prompt", "a red circle", "--seed", "7", "--steps", "3",
        "--guidance", "6", "--negative-prompt", "blurry", "--width", "48", "--out", str(out), "--quiet",
    )
    image = Image.open(out)
    assert image.size == (48, 32)
    params = image.text["parameters"]
    assert params.startswith("a red circle\nNegative prompt: blurry\n")
    assert "Steps: 3" in params and "Seed: 7" in params and "CFG scale: 6" in params
    engine = Engine(EngineConfig())
    spec = RequestSpec(model="tiny-sd1", prompt="a red circle", seed=7, steps=3, guidance_scale=6.0,
                       negative_prompt="blurry", width=48)
    expected = engine.generate([engine.validate(spec)])[0].images[0]
    # The CLI ran in a subprocess with OMP_NUM_THREADS=1, this process with more threads: a
    # different reduction order, so the project's tolerance (2 of 255), not bit equality.
    assert max_pixel_difference(np.asarray(image), expected) <= 2


def test_generate_requests_file_in_input_order(tmp_path, capsys):
    lines = [
        {"prompt": "a cat", "seed": 1, "steps": 2},
        {"prompt": "a dog", "seed": 2, "steps": 3, "num_images": 2, "scheduler": "ddim"},
        {"prompt": "a tree", "seed": 3, "steps": 1, "width": 48, "guidance_scale": 1.0},
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out_dir = tmp_path / "out"
    code, _, err = sdserve_in_process(
        capsys, "generate", "--model", "tiny-sd1", "--requests", str(requests), "--out-dir", str(out_dir), "--quiet"
    )
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["0000.png", "0001_0.png", "0001_1.png", "0002.png"]
    assert Image.open(out_dir / "0002.png").size == (48, 32)
    assert "Seed: 2" in Image.open(out_dir / "0001_1.png").text["parameters"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--steps", "0"], "steps: must be between 1 and"),
        (["--width", "30"], "width: must be a multiple of 8"),
        (["--scheduler", "nope"], "scheduler: unknown scheduler"),
        (["--guidance-scale", "-2"], "guidance_scale: must be between 0"),
        (["--num-images", "99"], "num_images: must be between 1 and 8"),
        (["--model", "no-such-model"], "model: unknown model"),
        (["--steps", "abc"], "invalid int value"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(tmp_path, capsys, args, needle):
    code, _, err = sdserve_in_process(
        capsys, "generate", "--model", "tiny-sd1", "--prompt", "x", "--out", str(tmp_path / "x.png"), *args
    )
    assert code == 2, err
    assert needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "line,needle",
    [
        ('{"prompt": "x", "steps": 0}', "line 2: steps: must be between 1 and"),
        ('{"prompt": "x", ', "line 2: malformed JSON"),
        ('{"prompt": "x", "stepz": 3}', "line 2: unknown field 'stepz'"),
        ('{"prompt": "x", "width": "wide"}', "line 2: width: must be an integer"),
    ],
)
def test_bad_requests_file_line_is_named(tmp_path, capsys, line, needle):
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"prompt": "fine"}\n' + line + "\n")
    code, _, err = sdserve_in_process(
        capsys, "generate", "--model", "tiny-sd1", "--requests", str(requests), "--out-dir", str(tmp_path / "o")
    )
    assert code == 2
    assert needle in err and "r.jsonl" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_lora_flag_parsing():
    from sdserve.cli.generate_cmd import parse_lora_flag

    assert parse_lora_flag("a.safetensors") == {"path": "a.safetensors"}
    assert parse_lora_flag("a.safetensors:-0.5") == {"path": "a.safetensors", "scale": -0.5}
    assert parse_lora_flag("d/x.st:1:0.25:0.75") == {"path": "d/x.st", "scale": 1.0, "start": 0.25, "end": 0.75}
    assert parse_lora_flag("c:/odd:name.st:2") == {"path": "c:/odd:name.st", "scale": 2.0}


def test_generate_with_lora_flags_equals_engine(tmp_path, capsys):
    from sdserve.engine.request import AdapterSpec
    from tests.engine.lora_cases import write_model_lora

    lora = write_model_lora("tiny-sd1", tmp_path, "style", rank=4, alpha=4.0, text_encoder=True)
    out = tmp_path / "x.png"
    code, _, err = sdserve_in_process(
        capsys, "generate", "--model", "tiny-sd1", "--prompt", "a cat", "--seed", "3", "--steps", "3",
        "--lora", f"{lora}:0.8", "--lora", f"{lora}:-0.3:0.5:1", "--out", str(out), "--quiet",
    )
    assert code == 0, err
    engine = Engine(EngineConfig())
    spec = RequestSpec(model="tiny-sd1", prompt="a cat", seed=3, steps=3, adapters=(
        AdapterSpec(path=str(lora), scale=0.8), AdapterSpec(path=str(lora), scale=-0.3, start=0.5, end=1.0)))
    expected = engine.generate([engine.validate(spec)])[0].images[0]
    assert max_pixel_difference(np.asarray(Image.open(out)), expected) == 0


def test_bad_lora_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    code, _, err = sdserve_in_process(
        capsys, "generate", "--model", "tiny-sd1", "--prompt", "a cat", "--steps", "2",
        "--lora", str(bad), "--out", str(tmp_path / "x.png"), "--quiet",
    )
    assert code == 2
    assert "adapter 'bad.safetensors': not a valid safetensors file" in err
    assert "Traceback" not in err and str(tmp_path) not in err.split("error:", 1)[1]


def test_image_and_conditioning_flags_equal_engine(tmp_path, capsys):
    import safetensors.torch
    import torch

    from sdserve.engine.request import EmbeddingSpec
    from tests.engine.test_image_inputs import mask_image, png, scene

    (tmp_path / "init.png").write_bytes(png(scene()))
    (tmp_path / "mask.png").write_bytes(png(mask_image()))
    safetensors.torch.save_file({"<x>": torch.randn(2, 32)}, str(tmp_path / "x.safetensors"))
    out = tmp_path / "o.png"
    code, _, err = sdserve_in_process(
        capsys, "generate", "--model", "tiny-sd1", "--prompt", "a <x>", "--seed", "2", "--steps", "3",
        "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--strength", "0.9",
        "--embedding", str(tmp_path / "x.safetensors"), "--out", str(out), "--quiet",
    )
    assert code == 0, err
    engine = Engine(EngineConfig())
    spec = RequestSpec(model="tiny-sd1", prompt="a <x>", seed=2, steps=3, init_image=png(scene()),
                       mask=png(mask_image()), strength=0.9,
                       embeddings=(EmbeddingSpec(path=str(tmp_path / "x.safetensors")),))
    expected = engine.generate([engine.validate(spec)])[0].images[0]
    assert max_pixel_difference(np.asarray(Image.open(out)), expected) == 0
