"""`sdserve generate --format jpeg|webp [--quality Q]`: the engine's image, its A1111 parameters
in EXIF UserComment, and bad flags as one line with exit 2."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sdserve.cli.image_output import encode_image, read_user_comment
from sdserve.engine import Engine, EngineConfig, RequestSpec
from tests.cli.test_cli import sdserve_in_process

_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


def _smooth_image() -> np.ndarray:
    y, x = np.mgrid[0:64, 0:96]
    return np.stack([x * 2, y * 3, (x + y)], axis=-1).astype(np.uint8)  # [64, 96, 3]


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_encode_image_round_trips_pixels_and_parameters(fmt):
    image = _smooth_image()
    text = "a red circle\nSteps: 3, Sampler: Euler a, Seed: 7, Lora hashes: \"ü: abc\""
    data = encode_image(image, text, fmt, quality=95)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == fmt.upper()
    assert np.abs(np.asarray(decoded.convert("RGB"), dtype=int) - image).mean() < 2.0
    assert read_user_comment(decoded.getexif().get_ifd(_EXIF_IFD)[_USER_COMMENT]) == text
    smaller = encode_image(image, text, fmt, quality=10)
    assert len(smaller) < len(data)  # --quality reaches the encoder


@pytest.mark.slow  # 11 s cold (the first in-process engine load); the format checks above are fast
def test_generate_requests_as_webp(tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"model": "tiny-sd1", "prompt": "a red circle", "seed": 7, "steps": 2}\n')
    code, out, err = sdserve_in_process(capsys, "generate", "--requests", str(requests), "--out-dir",
                                        str(tmp_path / "out"), "--format", "webp", "--quiet")
    assert code == 0, err
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["0000.webp"]
    image = Image.open(tmp_path / "out" / "0000.webp")
    assert image.format == "WEBP"
    parameters = read_user_comment(image.getexif().get_ifd(_EXIF_IFD)[_USER_COMMENT])
    assert parameters.startswith("a red circle\n") and "Seed: 7" in parameters and "Steps: 2" in parameters


@pytest.mark.slow
def test_generate_format_jpeg_is_the_engine_image(tmp_path, capsys):
    out = tmp_path / "x.jpg"
    code, _, err = sdserve_in_process(
        capsys, "generate", "--model", "tiny-sd1", "--prompt", "a red circle", "--seed", "7", "--steps", "2",
        "--format", "jpeg", "--quality", "100", "--out", str(out), "--quiet")
    assert code == 0, err
    image = Image.open(out)
    assert image.format == "JPEG"
    engine = Engine(EngineConfig())
    expected = engine.generate([engine.validate(RequestSpec(model="tiny-sd1", prompt="a red circle", seed=7,
                                                            steps=2))])[0].images[0]
    assert np.abs(np.asarray(image.convert("RGB"), dtype=int) - expected).mean() < 3.0  # JPEG at quality 100


@pytest.mark.parametrize("flags, message", [
    (["--quality", "90"], "--quality: only with --format jpeg or webp"),
    (["--format", "webp", "--quality", "0"], "--quality: must be 1-100"),
])
def test_bad_quality_is_one_line_exit_2(tmp_path, capsys, flags, message):
    code, _, err = sdserve_in_process(capsys, "generate", "--model", "tiny-sd1", "--prompt", "a", *flags,
                                      "--out", str(tmp_path / "x.jpg"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.jpg").exists()
