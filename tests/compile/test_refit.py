"""`compile refit`: new weights for an export without re-exporting, equal to a fresh export of the
fused model, always computed from the export's base weights (A -> B -> A gives A exactly)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from safetensors.numpy import load_file

from sdserve.compile.fused_model import FuseConfig, fuse_model
from sdserve.compile.manifest import read_manifest
from sdserve.compile.onnx_export import OnnxConfig, export_onnx
from sdserve.compile.onnx_session import open_session
from sdserve.compile.source import LoRAArg
from tests.compile.conftest import MODEL, run_cli, tree_digest

SCALE_A, SCALE_B = 0.7, 1.5


@pytest.fixture(scope="module")
def exports(tmp_path_factory, adapters, onnx_export):
    """The base export (the session's), and a fresh export of the model with the stack fused."""
    work = tmp_path_factory.mktemp("refit")
    base = onnx_export
    fused = fuse_model(FuseConfig(model=MODEL, out=work / "fused", progress=False,
                                  loras=(LoRAArg(adapters["a"], SCALE_A), LoRAArg(adapters["b"], SCALE_B)))).out
    fresh = work / "fresh"
    assert not export_onnx(OnnxConfig(model=str(fused), out=fresh, progress=False)).failed
    return {"work": work, "base": base, "fresh": fresh}


def _refit(capsys, source, out, *loras, check=True):
    args = [arg for lora in loras for arg in ("--lora", lora)] + ([] if check else ["--no-check"])
    code, stdout, stderr = run_cli(capsys, "compile", "refit", "--onnx", str(source), *args, "--out", str(out),
                                   "--no-progress")
    assert code == 0, stderr
    return stdout


def _initializers(directory, component):
    graph = onnx.load(str(directory / component / "model.onnx")).graph
    return {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}


def _outputs(directory, component, feed):
    session = open_session(directory, read_manifest(directory), component)
    return session.run(None, feed)


def _feeds():
    generator = torch.Generator().manual_seed(9)
    return {
        "unet": {"sample": torch.randn(2, 4, 16, 16, generator=generator).numpy(),
                 "timestep": np.array([10.0, 700.0], np.float32),
                 "encoder_hidden_states": torch.randn(2, 77, 32, generator=generator).numpy()},
        "text_encoder": {"input_ids": torch.randint(0, 100, (2, 77), generator=generator).numpy()},
    }


def test_refit_equals_a_fresh_export_of_the_fused_model(exports, adapters, capsys):
    out = exports["work"] / "refit-ab"
    before = tree_digest(exports["base"])
    stdout = _refit(capsys, exports["base"], out, f"{adapters['a']}:{SCALE_A}", f"{adapters['b']}:{SCALE_B}")
    assert "unet" in stdout and "max rel" in stdout  # checked against the fused torch model
    assert tree_digest(exports["base"]) == before  # the export is only read
    # The refit holds the changed initializers, not the export's graphs and weights: it reads them in place.
    assert not list(out.rglob("*.onnx")) and not list(out.rglob("*.onnx.data"))
    refit_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    changed_bytes = sum(p.stat().st_size for p in out.rglob("refit.safetensors"))
    assert refit_bytes - changed_bytes < 200_000  # configs, scheduler, tokenizer, manifest
    manifest = read_manifest(out)
    assert [entry["scale"] for entry in manifest.stack] == [SCALE_A, SCALE_B]
    for component in ("unet", "text_encoder"):
        ours = load_file(str(out / manifest.components[component].overrides))
        fresh = _initializers(exports["fresh"], component)
        assert len(ours) > 10
        for name, value in ours.items():
            np.testing.assert_array_equal(value, fresh[name], err_msg=name)  # same sum, same rounding
    for component, feed in _feeds().items():
        got = _outputs(out, component, feed)
        want = _outputs(exports["fresh"], component, feed)
        base = _outputs(exports["base"], component, feed)
        np.testing.assert_allclose(got[0], want[0], atol=1e-6, rtol=1e-6)
        assert np.abs(got[0] - base[0]).max() > 1e-3  # the session did take the new weights


def test_refit_always_starts_from_the_base_weights(exports, adapters, capsys):
    a, b = f"{adapters['a']}:{SCALE_A}", f"{adapters['b']}:{SCALE_B}"
    work = exports["work"]
    _refit(capsys, exports["base"], work / "A", a, check=False)  # the weights are compared here
    _refit(capsys, work / "A", work / "AB", b, check=False)  # a refit of a refit: B alone, not A + B
    _refit(capsys, work / "AB", work / "ABA", a, check=False)
    first = load_file(str(work / "A" / "unet" / "refit.safetensors"))
    again = load_file(str(work / "ABA" / "unet" / "refit.safetensors"))
    assert first.keys() == again.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)
    _refit(capsys, exports["base"], work / "B", b, check=False)
    only_b = load_file(str(work / "B" / "unet" / "refit.safetensors"))
    after_a = load_file(str(work / "AB" / "unet" / "refit.safetensors"))
    assert after_a.keys() == only_b.keys()
    assert read_manifest(work / "AB").components["text_encoder"].overrides == ""  # A's text-encoder part gone
    for name in only_b:  # B after A is B alone: nothing of A stayed in the weights
        np.testing.assert_array_equal(after_a[name], only_b[name], err_msg=name)
    assert any(not np.array_equal(first[name], only_b[name]) for name in first.keys() & only_b.keys())


def test_refit_refuses_a_directory_that_is_not_an_export(adapters, tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "compile", "refit", "--onnx", str(tmp_path), "--lora", str(adapters["a"]),
                              "--out", str(tmp_path / "o"))
    assert code == 2 and stderr.count("\n") == 1 and "--onnx" in stderr


def test_refit_without_the_base_at_hand_says_it_is_unchecked(exports, adapters, tmp_path, capsys):
    import json
    import shutil

    copy = shutil.copytree(exports["base"], tmp_path / "moved")
    manifest = json.loads((copy / "sdserve-compile.json").read_text())
    manifest["base"] = str(tmp_path / "gone")  # the model it was exported from is not on this machine
    (copy / "sdserve-compile.json").write_text(json.dumps(manifest))
    stdout = _refit(capsys, copy, tmp_path / "out", f"{adapters['a']}:{SCALE_A}")
    assert "not checked: the base model" in stdout and "max rel" not in stdout
    assert read_manifest(tmp_path / "out").components["unet"].overrides


def test_a_refit_whose_export_is_gone_or_changed_is_refused(exports, adapters, tmp_path, capsys):
    """A refit reads its export's graphs and weights in place: moved away from it, or after the
    export was rewritten, every reader refuses it in one line (refit, check, the engine)."""
    import os
    import shutil

    from sdserve.engine import Engine, EngineConfig
    from sdserve.errors import InvalidArgument

    export = shutil.copytree(exports["base"], tmp_path / "export")
    _refit(capsys, export, tmp_path / "refit", f"{adapters['a']}:{SCALE_A}", check=False)
    moved = shutil.copytree(tmp_path / "refit", tmp_path / "elsewhere" / "refit")  # without its export
    code, _, stderr = run_cli(capsys, "compile", "check", str(moved))
    assert code == 2 and stderr.count("\n") == 1 and "base export" in stderr and "missing" in stderr
    # Moved together, the relative path still finds it.
    together = tmp_path / "together"
    together.mkdir()
    shutil.copytree(export, together / "export")
    shutil.copytree(tmp_path / "refit", together / "refit")
    assert read_manifest(together / "refit").components["unet"].overrides
    weights = export / "unet" / "model.onnx.data"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))  # rewritten
    for args in (("compile", "check", str(tmp_path / "refit")),
                 ("compile", "refit", "--onnx", str(tmp_path / "refit"), "--lora", str(adapters["b"]),
                  "--out", str(tmp_path / "again"), "--no-check", "--no-progress")):
        code, _, stderr = run_cli(capsys, *args)
        assert code == 2 and stderr.count("\n") == 1 and "has changed since the refit" in stderr, stderr
    assert not (tmp_path / "again").exists()
    with pytest.raises(InvalidArgument) as error:
        Engine(EngineConfig(device="cpu")).model_info(str(tmp_path / "refit"))
    assert error.value.field == "model" and "has changed" in error.value.message
