"""What `sdserve train controlnet` and `sdserve train ip-adapter` write uploads to a running server
and serves per request (issue 19, Interoperability), through the command line end to end:
train (a couple of steps on tiny-sd1), `sdserve adapters pack controlnet DIR --out FILE` then
`sdserve client adapters upload FILE --kind controlnet`, and `sdserve client adapters upload DIR
--kind ip_adapter` (packed on the fly); the served image equals the in-process engine's for the
trained directory itself (<= 2/255)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
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
)

SIDE = 32
TOLERANCE = 2


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    thread = ServerThread(make_config(tmp_path_factory.mktemp("trained-registry"))).start()
    yield thread
    thread.stop()


def _cli(capsys, *argv: str) -> str:
    """`sdserve ARGV` in process; its stdout. A non-zero exit fails the test with its stderr."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    assert not code, captured.err
    return captured.out


def _client(capsys, server: ServerThread, *argv: str) -> str:
    return _cli(capsys, "client", "--target", server.target, "--api-key", KEYS["alice"], "--timeout", "120", *argv)


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.slow  # ~35 s on the shared 2-core machine: training, then the first ControlNet check imports diffusers
def test_trained_controlnet_packs_uploads_and_serves(live, reference_engine, capsys, tmp_path):
    from tests.trainers.test_controlnet import write_triplets

    data, out, packed = write_triplets(tmp_path / "data"), tmp_path / "net", tmp_path / "net.safetensors"
    _cli(capsys, "train", "controlnet", "--model", MODEL, "--data", str(data), "--out", str(out), "--steps", "2",
         "--batch-size", "2", "--lr", "0.05", "--resolution", str(SIDE), "--no-progress")
    assert "wrote controlnet" in _cli(capsys, "adapters", "pack", "controlnet", str(out), "--out", str(packed))
    info = json.loads(_client(capsys, live, "adapters", "upload", str(packed), "--name", "trained-edges",
                              "--kind", "controlnet", "--family", "sd1"))
    assert info["kind"] == "controlnet"
    control = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    control[8:24, 8:24] = 255
    request = {"model": MODEL, "prompt": "a photo of a box", "seed": 11, "steps": 3, "width": SIDE, "height": SIDE}
    unit = {"image": _png(control), "scale": 1.0}
    served = live.client("alice").generate({**request, "controlnets": [{**unit, "model": "trained-edges"}]})
    want = reference_images(reference_engine, {**request, "controlnets": [{**unit, "model": str(out)}]})[0]
    assert max_diff(png_pixels(served.images[0].png), want) <= TOLERANCE


# slow: test_conditioning_uploads serves uploaded IP-Adapters and tests/trainers the trainer's output (14 s)
@pytest.mark.slow
def test_trained_ip_adapter_directory_uploads_and_serves(live, reference_engine, capsys, tmp_path):
    from tests.trainers.conftest import write_folder

    data, out = write_folder(tmp_path / "data", count=2, size=(SIDE, SIDE)), tmp_path / "ip"
    _cli(capsys, "train", "ip-adapter", "--model", MODEL, "--data", str(data), "--out", str(out), "--steps", "1",
         "--batch-size", "2", "--encoder-steps", "0", "--resolution", str(SIDE), "--no-progress")
    info = json.loads(_client(capsys, live, "adapters", "upload", str(out), "--name", "trained-face",
                              "--kind", "ip-adapter", "--model", MODEL))
    assert (info["kind"], info["family"]) == ("ip_adapter", "sd1")
    reference = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    reference[4:28, 4:20] = (20, 220, 40)
    request = {"model": MODEL, "prompt": "a photo of a box", "seed": 12, "steps": 3, "width": SIDE, "height": SIDE}
    unit = {"image": _png(reference), "scale": 1.0}
    served = live.client("alice").generate({**request, "ip_adapters": [{**unit, "model": "trained-face"}]})
    want = reference_images(reference_engine, {**request, "ip_adapters": [{**unit, "model": str(out)}]})[0]
    assert max_diff(png_pixels(served.images[0].png), want) <= TOLERANCE


def test_upload_of_a_directory_needs_a_conditioning_kind(live, capsys, tmp_path):
    try:
        main(["client", "--target", live.target, "--api-key", KEYS["alice"], "adapters", "upload", str(tmp_path),
              "--name", "x"])
    except SystemExit as exc:
        assert exc.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only --kind controlnet and ip_adapter upload a directory" in err[0], err
    with pytest.raises(SystemExit) as exit_info:
        main(["adapters", "pack", "controlnet", str(tmp_path), "--out", str(tmp_path / "x.safetensors")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a diffusers ControlNet directory" in err[0], err
    assert not Path(tmp_path / "x.safetensors").exists()
