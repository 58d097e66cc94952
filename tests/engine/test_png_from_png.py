"""`sdserve generate --from-png FILE` re-runs the request in FILE's parameters chunk: the same
pixels (in one process: the same thread count, so bit equality holds), and a LoRA it names that
was not given again is refused in one line."""

import numpy as np
from PIL import Image

from tests.cli.test_cli import sdserve_in_process
from tests.engine.lora_cases import write_model_lora

REQUEST = ["--model", "tiny-sd1", "--prompt", "a red circle, left", "--negative-prompt", "", "--seed", "41",
           "--steps", "3", "--guidance", "6.5", "--scheduler", "DPM++ 2M Karras", "--width", "48",
           "--clip-skip", "2", "--guidance-start", "0.25", "--quiet"]


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_from_png_reproduces_the_image(tmp_path, capsys):
    lora = write_model_lora("tiny-sd1", tmp_path, "dots", rank=4, alpha=4)
    other = write_model_lora("tiny-sd1", tmp_path, "other", rank=4, alpha=4, seed=3)
    first = tmp_path / "first.png"
    code, _, err = sdserve_in_process(capsys, "generate", *REQUEST, "--lora", f"{lora}:0.7:0:0.8", "--out", str(first))
    assert code == 0, err
    params = Image.open(first).text["parameters"]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in params and "Lora hashes" in params

    again = tmp_path / "again.png"
    code, _, err = sdserve_in_process(capsys, "generate", "--from-png", str(first), "--lora", str(other),
                                      "--lora", str(lora), "--out", str(again), "--quiet")
    assert code == 0, err
    assert np.array_equal(_pixels(first), _pixels(again))
    assert Image.open(again).text["parameters"] == params

    # a flag overrides the PNG's value: another seed, another image
    reseeded = tmp_path / "reseeded.png"
    code, _, err = sdserve_in_process(capsys, "generate", "--from-png", str(first), "--lora", str(lora),
                                      "--seed", "42", "--out", str(reseeded), "--quiet")
    assert code == 0, err
    assert "Seed: 42," in Image.open(reseeded).text["parameters"]
    assert not np.array_equal(_pixels(first), _pixels(reseeded))

    # the LoRA is missing (another file given): one line naming it, exit 2
    code, _, err = sdserve_in_process(capsys, "generate", "--from-png", str(first), "--lora", str(other),
                                      "--out", str(tmp_path / "x.png"), "--quiet")
    assert code == 2
    assert err.strip().count("\n") == 0 and "LoRA 'dots'" in err and "--lora" in err


def test_from_png_refusals(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    code, _, err = sdserve_in_process(capsys, "generate", "--from-png", str(plain), "--out", str(tmp_path / "o.png"))
    assert code == 2 and "no 'parameters' text chunk" in err
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: DPM++ SDE, CFG scale: 7, Seed: 1, Size: 64x64, "
                  "Model: tiny-sd1, Denoising strength: 0.5")
    odd = tmp_path / "odd.png"
    Image.new("RGB", (8, 8)).save(odd, pnginfo=info)
    code, _, err = sdserve_in_process(capsys, "generate", "--from-png", str(odd), "--out", str(tmp_path / "o.png"))
    assert code == 2 and "sampler 'DPM++ SDE'" in err and err.strip().count("\n") == 0
    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, "
                  "Model: tiny-sd1, Denoising strength: 0.5")
    Image.new("RGB", (8, 8)).save(odd, pnginfo=info)
    code, _, err = sdserve_in_process(capsys, "generate", "--from-png", str(odd), "--out", str(tmp_path / "o.png"))
    assert code == 2 and "--init-image" in err
    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, "
                  'Model: tiny-sd1, ControlNet 0: "Module: canny, Model: edges, Weight: 1"')
    Image.new("RGB", (8, 8)).save(odd, pnginfo=info)
    code, _, err = sdserve_in_process(capsys, "generate", "--from-png", str(odd), "--out", str(tmp_path / "o.png"))
    assert code == 2 and "Model: edges" in err and "--controlnet" in err and err.strip().count("\n") == 0
