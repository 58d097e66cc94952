"""`compile tensorrt`: without tensorrt, one line naming the extra and exit 2, nothing written; the
optimization profiles every served graph's inputs get (checkable without TensorRT); and, where
tensorrt imports, engines built from the export and refitted from a refit directory."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from sdserve.compile.manifest import read_manifest
from sdserve.compile.tensorrt_build import BUILT, ENGINE_MANIFEST, profile_shapes
from tests.compile.conftest import run_cli

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_without_tensorrt_the_command_names_the_extra_and_exits_2(onnx_export, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError, installed or not
    out = tmp_path / "engines"
    code, stdout, stderr = run_cli(capsys, "compile", "tensorrt", "--onnx", str(onnx_export), "--out", str(out))
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and "sdserve[tensorrt]" in stderr and "tensorrt is not installed" in stderr
    assert not out.exists() and stdout == ""


def test_every_served_input_gets_a_profile_from_the_models_limits(onnx_export):
    manifest = read_manifest(onnx_export)
    info = json.loads((onnx_export / "sdserve.json").read_text())
    vae = json.loads((onnx_export / manifest.components["vae_decoder"].config).read_text())
    info["vae_scale_factor"] = factor = 2 ** (len(vae["block_out_channels"]) - 1)
    low, high = info["limits"]["min_side"], info["limits"]["max_side"]
    side = info["defaults"]["height"]
    sample = next(t for t in manifest.components["unet"].inputs if t.name == "sample")
    assert profile_shapes(sample, info, 8) == ((1, 4, low // factor, low // factor),
                                               (2, 4, side // factor, side // factor),
                                               (8, 4, high // factor, high // factor))
    image = manifest.components["vae_encoder"].inputs[0]
    assert profile_shapes(image, info, 4) == ((1, 3, low, low), (2, 3, side, side), (4, 3, high, high))
    for name in BUILT:
        for tensor in manifest.components[name].inputs if name in manifest.components else ():
            smallest, best, largest = profile_shapes(tensor, info, 8)
            assert all(a <= b <= c for a, b, c in zip(smallest, best, largest)), (name, tensor.name)


@pytest.mark.skipif(not HAVE_TENSORRT, reason="tensorrt is not installed")
def test_engines_build_and_a_refit_directory_refits_them(onnx_export, adapters, tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "compile", "tensorrt", "--onnx", str(onnx_export), "--out", str(tmp_path / "base"),
                              "--max-batch", "2", "--no-progress")
    assert code == 0, stderr
    record = json.loads((tmp_path / "base" / ENGINE_MANIFEST).read_text())
    assert set(record["engines"]) == {name for name in BUILT if name in read_manifest(onnx_export).components}
    code, _, stderr = run_cli(capsys, "compile", "refit", "--onnx", str(onnx_export), "--lora", str(adapters["a"]),
                              "--out", str(tmp_path / "refit"), "--no-check", "--no-progress")
    assert code == 0, stderr
    code, stdout, stderr = run_cli(capsys, "compile", "tensorrt", "--onnx", str(tmp_path / "refit"),
                                   "--out", str(tmp_path / "refitted"), "--max-batch", "2", "--no-progress")
    assert code == 0 and "weights refitted" in stdout, stderr
