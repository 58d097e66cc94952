"""`sdserve client ...` against a live server: generate, adapters upload/list/get/delete, models."""

from __future__ import annotations

import json

import pytest

from sdserve.cli.main import main
from tests.server.conftest import KEYS, MODEL, max_diff, png_pixels, reference_images, sha


def _run(server, *argv: str, key: str = "alice") -> None:
    main(["client", "--target", server.target, "--api-key", KEYS[key], "--timeout", "60", *argv])


def test_generate_writes_the_engines_png(server, reference_engine, tmp_path, capsys):
    out = tmp_path / "out.png"
    _run(server, "generate", "--model", MODEL, "--prompt", "a red circle", "--seed", "4", "--steps", "3",
         "--guidance", "6", "--out", str(out), "--stream")
    captured = capsys.readouterr()
    assert f"{out}  seed=4" in captured.out and "step 3/3" in captured.err
    want = reference_images(reference_engine, {"model": MODEL, "prompt": "a red circle", "seed": 4, "steps": 3,
                                               "guidance_scale": 6.0})[0]
    assert max_diff(png_pixels(out.read_bytes()), want) <= 2


def test_adapter_commands(server, lora_bytes, tmp_path, capsys):
    path = tmp_path / "style.safetensors"
    path.write_bytes(lora_bytes["sd1_a"])
    _run(server, "adapters", "upload", str(path), "--name", "cli-style", "--family", "sd1", key="bob")
    assert json.loads(capsys.readouterr().out)["sha256"] == sha(lora_bytes["sd1_a"])
    _run(server, "adapters", "list", key="bob")
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "FAMILY", "KIND", "FORM", "RANK", "TARGETS", "SCOPE", "BYTES", "SHA256"]
    listed = {line.split()[0]: line.split() for line in lines}
    name, family, kind, form, rank, targets, scope, size, digest = listed["cli-style"]
    assert (family, kind, form, scope, digest) == ("sd1", "lora", "lora", "own", sha(lora_bytes["sd1_a"]))
    assert int(rank) > 0 and int(targets) > 0 and int(size) == len(lora_bytes["sd1_a"])
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
