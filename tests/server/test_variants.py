"""Compiled variants (issue 20 item 4): a request whose stack is exactly a fused directory's runs
there, transparently; every other request stays eager and batches with the base's others.

The oracle is the in-process engine serving the same stack per request, by path (which the
engine's tests hold to diffusers, and tests/compile/test_fuse.py holds to the fused model).
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from sdserve.errors import InvalidArgument
from sdserve.server.variants import VariantConfig, load_variants
from tests.server.conftest import (
    MODEL,
    ServerThread,
    make_config,
    max_diff,
    png_pixels,
    reference_images,
    sha,
)

SCALE_A, SCALE_B = 0.8, -0.6
BASE = {"model": MODEL, "prompt": "a red circle on the left", "steps": 4}


@pytest.fixture(scope="module")
def files(lora_bytes, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA files, and a fused tiny-sd1 with both folded in (by compile's own function)."""
    from sdserve.compile.fused_model import FuseConfig, fuse_model
    from sdserve.compile.source import LoRAArg

    root = tmp_path_factory.mktemp("variants")
    paths = {}
    for key in ("sd1_a", "sd1_b", "sd1_c"):
        paths[key] = root / f"{key}.safetensors"
        paths[key].write_bytes(lora_bytes[key])
    paths["fused"] = root / "hot-fused"
    fuse_model(FuseConfig(model=MODEL, out=paths["fused"], progress=False,
                          loras=(LoRAArg(paths["sd1_a"], SCALE_A), LoRAArg(paths["sd1_b"], SCALE_B))))
    return paths


def _base_path() -> str:
    from sdserve.models.builtin import builtin_path

    return str(builtin_path(MODEL))


@pytest.fixture(scope="module")
def served(files, tmp_path_factory):
    """tiny-sd1 served eagerly with variant "hot"; the same weights named by their directory are
    served only compiled (variant "hot-only")."""
    variants = (VariantConfig(model=MODEL, dir=str(files["fused"]), name="hot"),
                VariantConfig(model=_base_path(), dir=str(files["fused"]), name="hot-only"))
    thread = ServerThread(make_config(tmp_path_factory.mktemp("registry"), variants=variants)).start()
    for tenant in ("alice", "bob"):
        for name, key in (("a", "sd1_a"), ("b", "sd1_b"), ("c", "sd1_c")):
            _register(thread, tenant, name, files[key])
    yield thread
    thread.stop()


def _register(server: ServerThread, tenant: str, name: str, path: Path) -> None:
    """Name a file in the registry directly, as a finished upload does: the upload path and its
    validation are tests/server/test_uploads.py's; here they would cost a worker process each."""
    from sdserve.server.registry import Quota

    registry = server.core.registry
    staged = registry.tmp / f"{tenant}-{name}.part"
    shutil.copyfile(path, staged)
    registry.register(tenant, name, "lora", "sd1", staged, sha(path.read_bytes()), Quota(100, 1 << 30))


def _hot(**overrides) -> list[dict]:
    """The variant's stack by name, in the other order than it was fused (a sum: order-free)."""
    return [{"name": "b", "scale": SCALE_B, **overrides}, {"name": "a", "scale": SCALE_A}]


def _by_path(request: dict, files) -> dict:
    """The same request for the in-process engine: adapter names -> their files."""
    paths = {"a": files["sd1_a"], "b": files["sd1_b"], "c": files["sd1_c"]}
    adapters = [{**{k: v for k, v in a.items() if k != "name"}, "path": str(paths[a["name"]])}
                for a in request.get("adapters", [])]
    return {**request, "adapters": adapters}


def _image(response):
    (image,) = response.images
    return png_pixels(image.png)


def _engine_stats(server) -> list[tuple[int, int, int]]:
    """The base's adapter-runtime counters ([] until it first serves an adapter)."""
    return [(s.hits, s.misses, s.loads) for s in server.server.engine.residency_stats([MODEL])]


def test_the_exact_stack_runs_on_the_variant_with_the_per_request_image(served, files, reference_engine):
    request = {**BASE, "seed": 5, "adapters": _hot()}
    before = _engine_stats(served)
    response = served.client().generate(request, timeout=120)
    assert (response.backend, response.variant, response.model) == ("fused", "hot", MODEL)
    assert [a.sha256 for a in response.adapters] == [sha(files["sd1_b"].read_bytes()), sha(files["sd1_a"].read_bytes())]
    assert _engine_stats(served) == before  # the base's adapter runtime never saw the request
    (want,) = reference_images(reference_engine, _by_path(request, files))
    assert max_diff(_image(response), want) <= 2
    (plain,) = reference_images(reference_engine, {**BASE, "seed": 5})
    assert max_diff(_image(response), plain) > 2  # the stack changes the image: the variant has it


@pytest.mark.parametrize("adapters", [
    _hot(scale=SCALE_B / 2),  # another scale
    _hot(start=0.25),  # a window missing the first step
    _hot(end=0.75),  # ... or the last
    [{"name": "a", "scale": SCALE_A}],  # part of the stack
    [*_hot(), {"name": "c", "scale": 0.5}],  # more than the stack
], ids=["scale", "start", "end", "subset", "superset"])
def test_any_other_stack_stays_eager(served, files, reference_engine, adapters):
    request = {**BASE, "seed": 6, "adapters": adapters}
    response = served.client().generate(request, timeout=120)
    assert (response.backend, response.variant, response.model) == ("eager", "", MODEL)
    (want,) = reference_images(reference_engine, _by_path(request, files))
    assert max_diff(_image(response), want) <= 2


def test_a_concurrent_mix_gives_each_request_its_image_alone(served, files, reference_engine):
    requests = [
        {**BASE, "seed": 21, "adapters": _hot()},
        {**BASE, "seed": 22, "adapters": [{"name": "c", "scale": 0.7}]},
        {**BASE, "seed": 23},
        {**BASE, "seed": 24, "adapters": _hot(), "prompt": "a blue square"},
        {**BASE, "seed": 25, "adapters": _hot(scale=1.0)},
        {**BASE, "seed": 26, "adapters": [{"name": "a", "scale": SCALE_A}]},
    ]
    clients = [served.client("alice"), served.client("bob")]  # bob has his own names for the same files
    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(lambda i: clients[i % 2].generate(requests[i], timeout=120), range(len(requests))))
    assert [r.backend for r in responses] == ["fused", "eager", "eager", "fused", "eager", "eager"]
    for request, response in zip(requests, responses):
        (want,) = reference_images(reference_engine, _by_path(request, files))
        assert max_diff(_image(response), want) <= 2, request


def _backend_counts(server) -> dict[tuple[str, str, str], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read().decode()
    counts = {}
    for labels, value in re.findall(r"^sdserve_backend_requests_total\{(.*)\} (\S+)$", text, re.MULTILINE):
        named = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        counts[(named["model"], named["backend"], named["variant"])] = float(value)
    return counts


def test_metrics_count_requests_per_backend(served):
    before = _backend_counts(served)
    client = served.client()
    for seed in (31, 32):
        client.generate({**BASE, "seed": seed, "steps": 2, "adapters": _hot()}, timeout=120)
    client.generate({**BASE, "seed": 33, "steps": 2}, timeout=120)
    after = _backend_counts(served)
    assert after[(MODEL, "fused", "hot")] - before.get((MODEL, "fused", "hot"), 0) == 2
    assert after[(MODEL, "eager", "")] - before.get((MODEL, "eager", ""), 0) == 1


def test_a_model_served_only_compiled_takes_only_its_stacks(served, files, reference_engine):
    client = served.client()
    only = _base_path()
    assert only in [m.name for m in client.list_models().models]
    for adapters in ([], [{"name": "a", "scale": SCALE_A}]):
        with pytest.raises(grpc.RpcError) as info:
            client.generate({**BASE, "model": only, "seed": 7, "adapters": adapters}, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("adapters:"), info.value.details()
    request = {**BASE, "model": only, "seed": 7, "adapters": _hot()}
    response = client.generate(request, timeout=120)
    assert (response.backend, response.variant, response.model) == ("fused", "hot-only", only)
    assert only not in served.server.engine.models._loaded  # its base weights never loaded
    (want,) = reference_images(reference_engine, _by_path({**request, "model": MODEL}, files))
    assert max_diff(_image(response), want) <= 2


# -- refused at start-up -----------------------------------------------------------------------


def _record_dir(tmp_path: Path, files, change) -> Path:
    """A copy of the fused dir's sdserve.json alone (all start-up reads), its record changed."""
    directory = tmp_path / "variant"
    directory.mkdir()
    meta = json.loads((files["fused"] / "sdserve.json").read_text())
    change(meta["compile"])
    (directory / "sdserve.json").write_text(json.dumps(meta))
    return directory


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(embeddings=[{"file": "toy.safetensors", "sha256": "0" * 64, "token": "<toy>"}]),
     "embeddings fused in"),
    (lambda r: r.update(sdserve_version="0.0.1"), "compiled by sdserve 0.0.1"),
    (lambda r: r.update(kind="unfused"), "not a fused model"),
    (lambda r: r.update(loras=[]), "records no LoRA"),
    (lambda r: r["loras"][0].update(sha256="x"), "malformed LoRA entry"),
], ids=["embeddings", "version", "kind", "no-lora", "bad-digest"])
def test_a_bad_record_is_refused(files, tmp_path, change, message):
    directory = _record_dir(tmp_path, files, change)
    with pytest.raises(InvalidArgument, match=message) as info:
        load_variants([VariantConfig(MODEL, str(directory))], {MODEL: Path(_base_path())}, [MODEL])
    assert "\n" not in str(info.value)


def test_an_onnx_manifest_is_read_for_its_stack(files, tmp_path):
    """A plain export (no stack) is refused; a refit's stack and base digest are read."""
    from sdserve import __version__

    record = json.loads((files["fused"] / "sdserve.json").read_text())["compile"]
    manifest = {"kind": "onnx", "sdserve_version": __version__, "base": MODEL, "base_digest": record["base_digest"],
                "stack": []}
    (tmp_path / "sdserve-compile.json").write_text(json.dumps(manifest))
    configs, bases = [VariantConfig(MODEL, str(tmp_path))], {MODEL: Path(_base_path())}
    with pytest.raises(InvalidArgument, match="records no LoRA"):
        load_variants(configs, bases, [MODEL])
    (tmp_path / "sdserve-compile.json").write_text(json.dumps({**manifest, "stack": record["loras"]}))
    (variant,) = load_variants(configs, bases, [MODEL]).variants
    assert variant.backend == "onnxruntime"
    assert variant.stack == tuple(sorted((e["sha256"], e["scale"]) for e in record["loras"]))
    (tmp_path / "sdserve-compile.json").write_text(json.dumps({**manifest, "stack": record["loras"],
                                                               "base_digest": "0" * 64}))
    with pytest.raises(InvalidArgument, match="another base model"):
        load_variants(configs, bases, [MODEL])


def test_two_variants_of_one_stack_or_one_name_are_refused(files):
    base = {MODEL: Path(_base_path())}
    with pytest.raises(InvalidArgument, match="serve the same stack"):
        load_variants([VariantConfig(MODEL, str(files["fused"]), "x"), VariantConfig(MODEL, str(files["fused"]), "y")],
                      base, [MODEL])
    with pytest.raises(InvalidArgument, match="names must be unique"):
        load_variants([VariantConfig(MODEL, str(files["fused"]), "x"),
                       VariantConfig(_base_path(), str(files["fused"]), "x")], {**base, _base_path(): base[MODEL]}, [])


def test_serve_refuses_a_variant_of_another_base_in_one_line(files, tmp_path, capsys):
    from sdserve.cli.main import main

    config = tmp_path / "server.toml"
    config.write_text(f'[server]\nport = 0\n[registry]\ndata_dir = "{tmp_path / "data"}"\n[models]\nserve = ["{MODEL}"]\n'
                      f'[[variants]]\nmodel = "tiny-sd2"\ndir = "{files["fused"]}"\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "fused from another base model than 'tiny-sd2'" in err and "\n" not in err, err


def test_an_unknown_variant_model_or_dir_is_refused(files, tmp_path):
    for variant, message in ((VariantConfig("no-such-model", str(files["fused"])), "variants\\[0\\].model: unknown"),
                             (VariantConfig(MODEL, str(tmp_path / "missing")), "variants\\[0\\].dir: not a directory")):
        thread = ServerThread(replace(make_config(tmp_path / "data"), variants=(variant,)))
        try:
            with pytest.raises(InvalidArgument, match=message):
                thread.start()
        finally:
            thread.loop.call_soon_threadsafe(thread.loop.stop)
            thread._thread.join(10)
    shutil.rmtree(tmp_path / "data", ignore_errors=True)


# -- an ONNX export refit with a stack (`sdserve compile refit`) as a variant ----------------------

ONNX_SCALE = 0.5


@pytest.fixture(scope="module")
def served_onnx(files, tmp_path_factory):
    """tiny-sd1 served eagerly, with `c` at ONNX_SCALE as an onnxruntime variant."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from sdserve.compile.onnx_export import OnnxConfig, export_onnx
    from sdserve.compile.refit import RefitConfig, refit
    from sdserve.compile.source import LoRAArg

    root = tmp_path_factory.mktemp("onnx-variant")
    assert not export_onnx(OnnxConfig(model=MODEL, out=root / "export", progress=False)).failed
    refit(RefitConfig(onnx=root / "export", out=root / "refit-c", loras=(LoRAArg(files["sd1_c"], ONNX_SCALE),),
                      check=False, progress=False))
    variants = (VariantConfig(model=MODEL, dir=str(root / "refit-c"), name="hot-onnx"),)
    thread = ServerThread(make_config(root / "registry", variants=variants)).start()
    _register(thread, "alice", "c", files["sd1_c"])
    yield thread
    thread.stop()


# slow: its ONNX export costs ~22 s; tests/compile/test_onnx_backend.py serves a refit dir in the default suite.
@pytest.mark.slow
def test_an_onnx_refit_serves_its_stack_and_refusals_fall_back_to_eager(served_onnx, files, reference_engine):
    client = served_onnx.client()
    request = {**BASE, "seed": 41, "adapters": [{"name": "c", "scale": ONNX_SCALE}]}
    response = client.generate(request, timeout=120)
    assert (response.backend, response.variant, response.model) == ("onnxruntime", "hot-onnx", MODEL)
    (want,) = reference_images(reference_engine, _by_path(request, files))
    assert max_diff(_image(response), want) <= 2
    # The onnxruntime backend reads only the last text layers (clip_skip 1): the eager base serves it.
    skipped = {**request, "clip_skip": 2}
    response = client.generate(skipped, timeout=120)
    assert (response.backend, response.variant) == ("eager", "")
    (want,) = reference_images(reference_engine, _by_path(skipped, files))
    assert max_diff(_image(response), want) <= 2
