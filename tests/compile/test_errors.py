"""Bad input to `sdserve compile`: one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json
import sys

import pytest

from tests.compile.conftest import MODEL, base_dir, run_cli


def _one_line_exit_2(code: int, stdout: str, stderr: str, *words: str) -> None:
    assert code == 2, stderr
    assert stderr.startswith("sdserve: error: ") and stderr.count("\n") == 1, stderr
    for word in words:
        assert word in stderr, stderr


def test_unknown_model(capsys, tmp_path):
    result = run_cli(capsys, "compile", "fuse", "--model", "no-such-model", "--lora", "x.safetensors",
                     "--out", str(tmp_path / "o"))
    _one_line_exit_2(*result, "--model", "unknown model 'no-such-model'")
    result = run_cli(capsys, "compile", "onnx", "--model", str(tmp_path), "--out", str(tmp_path / "o"))
    _one_line_exit_2(*result, "--model", "not a diffusers-format")
    assert not (tmp_path / "o").exists()


def test_adapter_of_another_family(capsys, tmp_path, adapters):
    result = run_cli(capsys, "compile", "fuse", "--model", MODEL, "--lora", str(adapters["xl"]),
                     "--out", str(tmp_path / "o"))
    _one_line_exit_2(*result, "--lora", "xl.safetensors", "sd1")
    result = run_cli(capsys, "compile", "fuse", "--model", MODEL, "--lora", str(adapters["toy"]),
                     "--out", str(tmp_path / "o"))
    _one_line_exit_2(*result, "--lora", "not a LoRA file")
    assert not (tmp_path / "o").exists()


def test_multi_vector_embedding_is_refused(capsys, tmp_path, adapters):
    result = run_cli(capsys, "compile", "fuse", "--model", MODEL, "--embedding", f"{adapters['two']}:<two>",
                     "--out", str(tmp_path / "o"))
    _one_line_exit_2(*result, "--embedding", "2 vectors")
    result = run_cli(capsys, "compile", "fuse", "--model", MODEL, "--embedding", f"{adapters['toy']}:c",
                     "--out", str(tmp_path / "o"))
    _one_line_exit_2(*result, "--embedding", "'c' is already in the model's vocabulary")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("step", ["fuse", "onnx"])
def test_out_exists_without_force(capsys, tmp_path, adapters, step):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    extra = ["--lora", str(adapters["a"])] if step == "fuse" else []
    result = run_cli(capsys, "compile", step, "--model", MODEL, *extra, "--out", str(out))
    _one_line_exit_2(*result, "--out", "exists; pass --force")
    assert (out / "keep.txt").read_text() == "mine"


def test_out_inside_the_model_is_refused_even_with_force(capsys, adapters):
    result = run_cli(capsys, "compile", "fuse", "--model", MODEL, "--lora", str(adapters["a"]),
                     "--out", str(base_dir() / "unet"), "--force")
    _one_line_exit_2(*result, "--out", "never writes")


def test_onnx_or_onnxruntime_missing(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    result = run_cli(capsys, "compile", "onnx", "--model", MODEL, "--out", str(tmp_path / "o"))
    _one_line_exit_2(*result, "onnxruntime is not installed", "sdserve[onnx]")


def test_bad_opset(capsys, tmp_path):
    result = run_cli(capsys, "compile", "onnx", "--model", MODEL, "--opset", "9", "--out", str(tmp_path / "o"))
    _one_line_exit_2(*result, "--opset")


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    from sdserve.compile.onnx_export import OnnxConfig, export_onnx

    out = tmp_path_factory.mktemp("small") / "onnx"
    assert not export_onnx(OnnxConfig(model=MODEL, out=out, progress=False)).failed
    return out


def _copy(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_compiled_dir_from_another_version(capsys, tmp_path, small_export):
    code, stdout, _ = run_cli(capsys, "compile", "check", str(small_export))
    assert code == 0 and "unet" in stdout
    copy = _copy(small_export, tmp_path / "old")
    manifest = json.loads((copy / "sdserve-compile.json").read_text())
    manifest["sdserve_version"] = "0.0.1"
    (copy / "sdserve-compile.json").write_text(json.dumps(manifest))
    _one_line_exit_2(*run_cli(capsys, "compile", "check", str(copy)), "sdserve 0.0.1", "export it again")


def test_compiled_dir_with_a_missing_component(capsys, tmp_path, small_export):
    copy = _copy(small_export, tmp_path / "partial")
    (copy / "unet" / "model.onnx.data").unlink()
    _one_line_exit_2(*run_cli(capsys, "compile", "check", str(copy)), "unet", "missing")
    _one_line_exit_2(*run_cli(capsys, "compile", "check", str(tmp_path)), "not a compiled directory")


def test_unfuse_of_a_model_fused_by_another_version(capsys, tmp_path, adapters):
    from sdserve.compile.fused_model import FuseConfig, fuse_model
    from sdserve.compile.source import LoRAArg

    fused = fuse_model(FuseConfig(model=MODEL, out=tmp_path / "fused", progress=False,
                                  loras=(LoRAArg(adapters["a"], 1.0),))).out
    meta = json.loads((fused / "sdserve.json").read_text())
    meta["compile"]["sdserve_version"] = "0.0.1"
    (fused / "sdserve.json").write_text(json.dumps(meta))
    result = run_cli(capsys, "compile", "unfuse", "--model", str(fused), "--lora", str(adapters["a"]),
                     "--out", str(tmp_path / "u"))
    _one_line_exit_2(*result, "--model", "sdserve 0.0.1")
    assert not (tmp_path / "u").exists()
