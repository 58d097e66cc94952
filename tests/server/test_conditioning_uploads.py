"""Tenants upload ControlNets and IP-Adapters to a running server (issue 19, Interoperability).

A ControlNet dir and an IP-Adapter dir are packed into one safetensors file each
(`sdserve.adapters.conditioning`), uploaded over gRPC, and named by a request's units. The server
configured with the same directories in `[models]` is the oracle: the same request naming the
operator's model gives the same image. Also: the pack round-trips bit for bit, a second tenant
cannot see or use them, a ControlNet for another family and a pack of the wrong kind are refused
with one INVALID_ARGUMENT line naming the field, ListAdapters lists their kind, a delete takes
the model and its unpacked directory away, and a mixed batch serves each request as alone.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import safetensors.torch
from PIL import Image

from sdserve.adapters import conditioning
from tests.server.conftest import MODEL, ServerThread, make_config, max_diff, png_pixels, sha, wait_for

TOLERANCE = 2  # 8-bit rounding of one image computed twice in different batches (the brief's 2/255)


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory) -> Path:
    from tests.engine.test_controlnet import make_controlnet

    # ControlNetModel.from_unet on tiny-sd1's UNet, its zero convs drawn from seed 1 so it changes the image.
    return make_controlnet(MODEL, tmp_path_factory.mktemp("cn"), 1)


@pytest.fixture(scope="module")
def ip_dir(tmp_path_factory) -> Path:
    from tests.engine.test_ip_adapter import make_ip_adapter

    return make_ip_adapter(MODEL, tmp_path_factory.mktemp("ip"))


@pytest.fixture(scope="module")
def packs(controlnet_dir, ip_dir) -> dict[str, bytes]:
    return {"controlnet": conditioning.pack_controlnet(controlnet_dir), "ip_adapter": conditioning.pack_ip_adapter(ip_dir)}


@pytest.fixture(scope="module")
def cond_server(tmp_path_factory, controlnet_dir, ip_dir):
    """tiny-sd1 with the same directories also configured by the operator, as "edges" and "face"."""
    config = make_config(tmp_path_factory.mktemp("cond-registry"))
    models = replace(config.models, controlnets={"edges": str(controlnet_dir)}, ip_adapters={"face": str(ip_dir)})
    thread = ServerThread(replace(config, models=models)).start()
    yield thread
    thread.stop()


def _png(color: tuple[int, int, int], box: tuple[int, int, int, int]) -> str:
    """A 32x32 PNG (base64, as JSON carries bytes) with one box."""
    array = np.zeros((32, 32, 3), dtype=np.uint8)
    array[:] = (40, 120, 200)
    top, bottom, left, right = box
    array[top:bottom, left:right] = color
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BASE = {"model": MODEL, "prompt": "a dog", "steps": 3}
CONTROL = _png((250, 200, 20), (8, 16, 8, 24))
REFERENCE = _png((20, 220, 40), (4, 28, 4, 20))


def _cn(name: str, seed: int = 2) -> dict:
    return {**BASE, "seed": seed, "controlnets": [{"model": name, "image": CONTROL, "scale": 0.8}]}


def _ip(name: str, seed: int = 3) -> dict:
    return {**BASE, "seed": seed, "ip_adapters": [{"model": name, "image": REFERENCE, "scale": 0.7}]}


def _image(server: ServerThread, request: dict, tenant: str = "alice") -> np.ndarray:
    return png_pixels(server.client(tenant).generate(request, timeout=120).images[0].png)


def _code_and_details(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_pack_unpack_round_trip_is_bit_exact(packs, controlnet_dir, ip_dir, tmp_path):
    from sdserve.engine.store import directory_digest

    for kind, directory in (("controlnet", controlnet_dir), ("ip_adapter", ip_dir)):
        out = conditioning.unpack(packs[kind], "x", kind, tmp_path / kind)
        originals = sorted(p.relative_to(directory) for p in directory.rglob("*.safetensors"))
        assert originals == sorted(p.relative_to(out) for p in out.rglob("*.safetensors"))
        for relative in originals:
            want, got = safetensors.torch.load_file(directory / relative), safetensors.torch.load_file(out / relative)
            assert want.keys() == got.keys()
            assert all(want[k].dtype == got[k].dtype and bool((want[k] == got[k]).all()) for k in want), relative
        # Files save_pretrained wrote come back byte for byte: the same digest, one resident copy.
        assert directory_digest(out) == directory_digest(directory)
        for file in (p for p in directory.rglob("*") if p.is_file()):
            assert (out / file.relative_to(directory)).read_bytes() == file.read_bytes(), file


def test_uploaded_models_serve_like_the_configured_ones(cond_server, packs):
    alice = cond_server.client("alice")
    cn = alice.upload_adapter(packs["controlnet"], name="my-edges", kind="controlnet", family="sd1")
    ip = alice.upload_adapter(packs["ip_adapter"], name="my-face", kind="ip_adapter", model=MODEL)
    assert (cn.kind, cn.family, cn.sha256, cn.targets) == ("controlnet", "sd1", sha(packs["controlnet"]), 7)
    assert (ip.kind, ip.family, ip.targets) == ("ip_adapter", "sd1", 6)  # tiny-sd1: 6 cross-attention layers

    response = alice.generate(_cn("my-edges"), timeout=120)
    assert [(u.name, u.kind, u.sha256) for u in response.adapters] == [("my-edges", "controlnet", cn.sha256)]
    uploaded, configured = png_pixels(response.images[0].png), _image(cond_server, _cn("edges"))
    plain = _image(cond_server, {**BASE, "seed": 2})
    assert max_diff(uploaded, configured) <= TOLERANCE
    assert max_diff(uploaded, plain) > 10  # the unit changed the image

    uploaded, configured = _image(cond_server, _ip("my-face")), _image(cond_server, _ip("face"))
    assert max_diff(uploaded, configured) <= TOLERANCE
    assert max_diff(uploaded, _image(cond_server, {**BASE, "seed": 3})) > 10
    # Unpacked once, under the registry's data directory, named by the file's digest; the engine's
    # residency store keys it by its directory's digest, the configured copy's: one resident model.
    assert cond_server.core.registry.unpacked_path(cn.sha256).is_dir()
    store = cond_server.server.engine.runner.controlnets
    assert store.resolve(f"my-edges@{cn.sha256[:16]}", "x").digest == store.resolve("edges", "x").digest

    listed = {a.name: a for a in alice.list_adapters().adapters}
    assert (listed["my-edges"].kind, listed["my-face"].kind) == ("controlnet", "ip_adapter")
    assert alice.get_adapter("my-face").kind == "ip_adapter"


def test_uploaded_units_in_a_mixed_batch_equal_each_request_alone(cond_server, packs):
    """Five concurrent requests (uploaded ControlNet, uploaded IP-Adapter, both, the operator's
    ControlNet, none) are batched together by the engine; each image equals the request served
    alone."""
    alice = cond_server.client("alice")
    alice.upload_adapter(packs["controlnet"], name="mix-edges", kind="controlnet", family="sd1")
    alice.upload_adapter(packs["ip_adapter"], name="mix-face", kind="ip_adapter", family="sd1")
    both = {**_cn("mix-edges", 5), "ip_adapters": _ip("mix-face")["ip_adapters"]}
    requests = [_cn("mix-edges", 4), _ip("mix-face", 4), both, _cn("edges", 6), {**BASE, "seed": 7}]
    alone = [_image(cond_server, request) for request in requests]
    metrics = cond_server.core.metrics.registry

    def shared_calls() -> float:  # UNet calls with more rows than one request (2: CFG) has
        total = metrics.get_sample_value("sdserve_unet_batch_rows_count") or 0.0
        return total - (metrics.get_sample_value("sdserve_unet_batch_rows_bucket", {"le": "2.0"}) or 0.0)

    before = shared_calls()
    with ThreadPoolExecutor(len(requests)) as pool:
        batched = list(pool.map(lambda request: _image(cond_server, request), requests))
    assert shared_calls() > before  # some UNet calls served several of these requests at once
    for request, one, many in zip(requests, alone, batched):
        assert max_diff(one, many) <= TOLERANCE, request.get("controlnets") or request.get("ip_adapters")


def test_another_tenant_cannot_see_or_use_them(cond_server, packs):
    cond_server.client("alice").upload_adapter(packs["controlnet"], name="alices-edges", kind="controlnet",
                                               family="sd1")
    bob = cond_server.client("bob")
    assert "alices-edges" not in {a.name for a in bob.list_adapters().adapters}
    code, details = _code_and_details(lambda: bob.generate(_cn("alices-edges"), timeout=60))
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("controlnets[0].model:"), details
    code, _ = _code_and_details(lambda: bob.get_adapter("alices-edges"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_shared_upload_serves_every_tenant_and_a_tenants_own_name_comes_first(cond_server, packs, tmp_path):
    from tests.engine.test_controlnet import make_controlnet

    other = conditioning.pack_controlnet(make_controlnet(MODEL, tmp_path, 9))
    cond_server.client("admin").upload_adapter(packs["controlnet"], name="house-edges", kind="controlnet",
                                               family="sd1", shared=True)
    shared = _image(cond_server, _cn("house-edges"), tenant="bob")
    assert max_diff(shared, _image(cond_server, _cn("edges"), tenant="bob")) <= TOLERANCE
    # Alice's own "house-edges" (another ControlNet) shadows the shared one for her alone.
    cond_server.client("alice").upload_adapter(other, name="house-edges", kind="controlnet", family="sd1")
    assert max_diff(_image(cond_server, _cn("house-edges")), shared) > 10
    assert max_diff(_image(cond_server, _cn("house-edges"), tenant="bob"), shared) <= TOLERANCE
    # An upload named like the operator's model shadows it for its tenant (tenant, shared, operator).
    cond_server.client("alice").upload_adapter(other, name="edges", kind="controlnet", family="sd1")
    assert max_diff(_image(cond_server, _cn("edges")), _image(cond_server, _cn("edges"), tenant="bob")) > 10
    cond_server.client("alice").delete_adapter("edges")


def test_mismatched_family_and_wrong_kind_are_refused(cond_server, packs, tmp_path):
    from tests.engine.test_controlnet import make_controlnet

    alice = cond_server.client("alice")
    sdxl = conditioning.pack_controlnet(make_controlnet("tiny-sdxl", tmp_path, 3))
    code, details = _code_and_details(lambda: alice.upload_adapter(sdxl, name="xl-edges", kind="controlnet"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "\n" not in details
    assert details.startswith("data: ") and "another base model (cross_attention_dim" in details, details
    code, details = _code_and_details(lambda: alice.upload_adapter(packs["ip_adapter"], name="bad", kind="controlnet"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("data: ") and "packed ip_adapter" in details
    code, details = _code_and_details(lambda: alice.upload_adapter(sdxl, name="xl", kind="controlnet", family="sdxl"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("header.family: "), details
    names = {a.name for a in alice.list_adapters().adapters}
    assert not names & {"xl-edges", "bad", "xl"}


def test_a_name_of_another_kind_is_refused_naming_the_kind(cond_server, lora_bytes):
    alice = cond_server.client("alice")
    alice.upload_adapter(lora_bytes["sd1_a"], name="a-lora", family="sd1")
    code, details = _code_and_details(lambda: alice.generate(_cn("a-lora"), timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("controlnets[0].model: "), details
    assert "registered as kind 'lora', not 'controlnet'" in details
    code, details = _code_and_details(lambda: alice.generate(_ip("no-such-face"), timeout=60))
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("ip_adapters[0].model:")


def test_delete_removes_the_model_and_its_directory(cond_server, tmp_path):
    from tests.engine.test_ip_adapter import make_ip_adapter

    alice = cond_server.client("alice")
    packed = conditioning.pack_ip_adapter(make_ip_adapter(MODEL, tmp_path, seed=5))  # a file no other name holds
    info = alice.upload_adapter(packed, name="gone-face", kind="ip_adapter", family="sd1")
    _image(cond_server, _ip("gone-face"))
    registry = cond_server.core.registry
    assert registry.unpacked_path(info.sha256).is_dir()
    alice.delete_adapter("gone-face")
    code, details = _code_and_details(lambda: alice.generate(_ip("gone-face"), timeout=60))
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("ip_adapters[0].model:"), details
    assert wait_for(lambda: not registry.unpacked_path(info.sha256).exists(), 5)
    assert not registry.blob_path(info.sha256).exists()


def _slow_prepare() -> None:
    """What stands in for the model classes' imports: 2 s, twice the job's limit below."""
    import time

    time.sleep(2.0)


def checked_after_prepare(seconds: float) -> dict:
    """A job that takes `seconds` itself, run after `_slow_prepare`."""
    import time

    time.sleep(seconds)
    return {"slept": seconds}


checked_after_prepare.worker_prepare = _slow_prepare  # type: ignore[attr-defined]


# slow: a cold diffusers import in a worker (12 s); the upload tests above check the limits themselves
@pytest.mark.slow
def test_a_checks_imports_are_not_counted_against_the_files_time_limit():
    """The packed models' checks import diffusers first (~10 s on a busy machine); the worker does
    that before the job's clock starts, and the job itself is still bounded."""
    import asyncio

    from sdserve.errors import InvalidArgument
    from sdserve.server.config import RegistryConfig
    from sdserve.server.upload_check import UploadChecks

    async def main() -> None:
        pool = UploadChecks(RegistryConfig(validate_timeout_seconds=1.0, max_concurrent_uploads=1)).start()
        try:
            assert await pool.run(checked_after_prepare, 0.1) == {"slept": 0.1}  # 2 s of prepare, allowed
            with pytest.raises(InvalidArgument, match="longer than the server's limit of 1 s"):
                await pool.run(checked_after_prepare, 3.0)  # the job's own time, refused
        finally:
            pool.close()

    asyncio.run(main())


def test_collect_removes_unpacked_directories_no_name_points_to(tmp_path, packs):
    """What a crash can leave: an unpacked directory whose file's name is gone, or half an unpack."""
    from sdserve.server.registry import Quota, Registry

    registry = Registry(tmp_path)
    with registry.staging_file() as (staged, handle):
        handle.write(packs["controlnet"])
        handle.close()
        kept = registry.register("alice", "edges", "controlnet", "sd1", staged, sha(packs["controlnet"]),
                                 Quota(10, 1 << 30))
    conditioning.unpack(registry.blob_path(kept.sha256), "edges", "controlnet", registry.unpacked_path(kept.sha256))
    orphan, half = registry.unpacked_path("0" * 64), registry.unpacked / f".{'1' * 64}.tmp-x"
    orphan.mkdir()
    half.mkdir()
    registry.close()
    registry = Registry(tmp_path)
    assert registry.unpacked_path(kept.sha256).is_dir() and not orphan.exists() and not half.exists()
    registry.delete("alice", "edges")
    assert not registry.unpacked_path(kept.sha256).exists()


def test_inspect_reports_a_pack_and_checks_it_like_the_server(packs, tmp_path, capsys):
    import json

    from sdserve.cli.main import main

    for kind, targets in (("controlnet", 7), ("ip_adapter", 6)):
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(packs[kind])
        for model, verdict in ((MODEL, "fits (sd1)"), ("tiny-sdxl", "does not fit: ")):
            main(["adapters", "inspect", str(path), "--json", "--model", model])
            report = json.loads(capsys.readouterr().out)
            assert (report["kind"], report["targets"], report["cross_attention_dim"]) == (kind, targets, 32)
            assert report["model"]["verdict"].startswith(verdict), report
