"""The onnxruntime backend: a `compile onnx` directory served by the engine gives the eager model's
images (the eager engine on the same request is the oracle), mixes requests in one batch as the
eager path does, serves a refit (a compiled stack) as the eager engine serves that stack per
request, and refuses per-request weights naming their field (ControlNet units it serves when the
export holds their ControlNet: tests/compile/test_onnx.py)."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sdserve.api.types import AdapterSpec, EmbeddingSpec, RequestSpec
from sdserve.compile.manifest import MANIFEST_FILE
from sdserve.engine import Engine, EngineConfig
from sdserve.engine.onnx_backend import MANIFEST_FILE as ENGINE_MANIFEST_FILE
from sdserve.engine.onnx_backend import OnnxBackend, OnnxUNet
from sdserve.errors import InvalidArgument
from tests.compile.conftest import MODEL, run_cli

STEPS = 20
TOLERANCE = 2  # of 255, the bound


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(device="cpu", dtype="float32"))


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _requests(model: str) -> list[RequestSpec]:
    """Two requests that differ in everything a row reads: prompt, seed, scheduler (one draws from
    its generator at each step), guidance interval, image count; and an img2img (the VAE encoder)."""
    return [
        RequestSpec(model=model, prompt="a red circle", seed=11, steps=STEPS, guidance_end=0.6),
        RequestSpec(model=model, prompt="two blue squares", negative_prompt="green", seed=12, steps=STEPS,
                    scheduler="euler_a", guidance_scale=5.0, num_images=2),
        RequestSpec(model=model, prompt="a star", seed=13, steps=STEPS, init_image=_png(0), strength=0.6),
    ]


def _images(engine: Engine, specs: list[RequestSpec]) -> list[np.ndarray]:
    results = engine.generate([engine.validate(spec) for spec in specs])
    for result in results:
        assert not isinstance(result, Exception), result
    return [np.stack(result.images).astype(int) for result in results]  # each [n, H, W, 3]


def test_the_manifest_file_name_is_compiles():
    assert ENGINE_MANIFEST_FILE == MANIFEST_FILE


def test_onnx_dir_gives_the_eager_images_and_batches_like_eager(engine, onnx_export):
    eager = _images(engine, _requests(MODEL))
    specs = _requests(str(onnx_export))
    together = _images(engine, specs)
    loaded = engine.models.get(str(onnx_export))
    assert loaded.info.backend == "onnxruntime" and isinstance(loaded.unet, OnnxUNet)
    assert isinstance(engine.runner.backend_for(loaded), OnnxBackend)
    for ours, theirs in zip(together, eager, strict=True):
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= TOLERANCE
        assert ours.std() > 10  # an image, not a flat field both sides could agree on
    # Rows never mix: the two text-to-image requests alone give what they gave in the mixed batch.
    for spec, mixed in zip(specs[:2], together, strict=False):
        (alone,) = _images(engine, [spec])
        assert np.abs(alone - mixed).max() <= 1


def test_a_refit_dir_serves_its_stack_as_eager_serves_it_per_request(engine, onnx_export, adapters, capsys,
                                                                       tmp_path):
    scale = 0.8
    out = tmp_path / "refit-a"
    code, _, stderr = run_cli(capsys, "compile", "refit", "--onnx", str(onnx_export), "--lora",
                              f"{adapters['a']}:{scale}", "--out", str(out), "--no-check", "--no-progress")
    assert code == 0, stderr
    request = dict(prompt="a red circle", seed=21, steps=STEPS)
    (per_request,) = _images(engine, [RequestSpec(model=MODEL, adapters=(AdapterSpec(path=str(adapters["a"]),
                                                                                       scale=scale),), **request)])
    (base,) = _images(engine, [RequestSpec(model=str(onnx_export), **request)])
    (compiled,) = _images(engine, [RequestSpec(model=str(out), **request)])
    assert np.abs(compiled - per_request).max() <= TOLERANCE
    assert np.abs(base - per_request).max() > 10 * TOLERANCE  # the stack changes the image


@pytest.mark.parametrize("field", ["adapters", "embeddings"])
def test_per_request_weights_are_refused_naming_their_field(engine, onnx_export, adapters, field):
    extra = {"adapters": {"adapters": (AdapterSpec(path=str(adapters["a"]), scale=1.0),)},
             "embeddings": {"embeddings": (EmbeddingSpec(path=str(adapters["toy"]), token="<toy>"),)}}[field]
    with pytest.raises(InvalidArgument) as error:
        engine.validate(RequestSpec(model=str(onnx_export), prompt="x <toy>", **extra))
    assert error.value.field == field and "compiled" in error.value.message


def test_a_controlnet_unit_on_an_export_without_controlnets_is_refused(engine, onnx_export):
    from sdserve.api.types import ControlSpec

    unit = ControlSpec(model="canny", image=_png(1))
    with pytest.raises(InvalidArgument) as error:
        engine.validate(RequestSpec(model=str(onnx_export), prompt="x", controlnets=(unit,)))
    assert error.value.field == "controlnets[0].model" and "without ControlNets" in error.value.message


def test_uploads_are_checked_against_the_exported_modules(engine, onnx_export):
    # A server checks uploads for a family against its model's targets: read off the graphs,
    # they are the eager model's own (shapes, and convs' stride and padding).
    assert engine.lora_targets(str(onnx_export)) == dict(engine.lora_targets(MODEL))


def test_a_dir_from_another_sdserve_version_is_refused_naming_model(onnx_export, tmp_path):
    copy = shutil.copytree(onnx_export, tmp_path / "old")
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["sdserve_version"] = "0.0.1"
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    fresh = Engine(EngineConfig(device="cpu"))
    with pytest.raises(InvalidArgument) as error:
        fresh.validate(RequestSpec(model=str(copy), prompt="x"))
    assert error.value.field == "model" and "0.0.1" in error.value.message


def test_generate_cli_serves_an_onnx_dir(onnx_export, capsys, tmp_path):
    code, _, stderr = run_cli(capsys, "generate", "--model", str(onnx_export), "--prompt", "a red circle",
                              "--steps", "2", "--seed", "1", "--out", str(tmp_path / "x.png"), "--quiet")
    assert code == 0, stderr
    assert np.asarray(Image.open(tmp_path / "x.png")).shape == (32, 32, 3)
    code, _, stderr = run_cli(capsys, "generate", "--model", str(onnx_export), "--prompt", "x",
                              "--lora", f"{tmp_path / 'a.safetensors'}:0.5", "--out", str(tmp_path / "y.png"))
    assert code == 2 and "adapters" in stderr and len(stderr.strip().splitlines()) == 1



def test_a_server_serving_an_onnx_dir_says_onnxruntime_in_its_response(onnx_export, tmp_path):
    """No variant: the model itself is the export, so the response, request log and metrics name
    the backend that ran it (they said "eager", the no-variant default, before)."""
    from tests.server.conftest import ServerThread, make_config

    name = str(onnx_export)
    server = ServerThread(make_config(tmp_path / "registry", models=(name,))).start()
    try:
        response = server.client().generate({"model": name, "prompt": "a red circle", "steps": 2, "seed": 1},
                                            timeout=120)
        assert (response.backend, response.variant) == ("onnxruntime", "")
    finally:
        server.stop()


@pytest.mark.parametrize("policy, spinning", [("PASSIVE", "0"), ("", None)])
def test_sessions_take_torchs_thread_count_and_stop_spinning_when_passive(monkeypatch, policy, spinning):
    """onnxruntime's default pool is one thread per core whatever torch was given; a server run with
    one thread (the load bench, a replica per core) must not get two spinning ones for its ONNX models."""
    import onnxruntime

    from sdserve.engine.onnx_backend import session_options

    monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        options = session_options(onnxruntime)
        assert options.intra_op_num_threads == 1
        torch.set_num_threads(2)
        assert session_options(onnxruntime).intra_op_num_threads == 2
    finally:
        torch.set_num_threads(before)
    if spinning is not None:
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == spinning
    else:
        with pytest.raises(RuntimeError, match="allow_spinning"):  # unset: onnxruntime's default (spin)
            options.get_session_config_entry("session.intra_op.allow_spinning")
