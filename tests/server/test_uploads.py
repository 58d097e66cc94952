"""Bad uploads are refused naming the problem, and leave no file and no name behind."""

from __future__ import annotations

import io
from dataclasses import replace

import grpc
import pytest
import torch

from sdserve.api import convert
from sdserve.server.config import RegistryConfig
from tests.server.conftest import ServerThread, make_config, sha, tenants


@pytest.fixture(scope="module")
def upload_server(tmp_path_factory, lora_bytes):
    size = len(lora_bytes["sd1_a"])
    config = make_config(tmp_path_factory.mktemp("uploads"), models=("tiny-sd1", "tiny-sdxl"))
    config = replace(
        config,
        registry=replace(config.registry, max_adapter_bytes=4 * size),
        # bob may hold two adapters; admin a file and a half's worth of bytes.
        tenants=tenants(bob={"max_adapters": 2}, admin={"max_adapter_bytes_total": int(1.5 * size)}),
    )
    assert isinstance(config.registry, RegistryConfig)
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def _state(server):
    registry = server.core.registry
    return registry.files(), [(r.scope, r.name, r.sha256) for r in registry.list("alice")] + [
        (r.scope, r.name, r.sha256) for r in registry.list("bob")
    ]


def _refused(server, call, code, *needles):
    before = _state(server)
    with pytest.raises(grpc.RpcError) as info:
        call()
    details = info.value.details()
    assert info.value.code() == code, details
    print(code.name, details)
    for needle in needles:
        assert needle in details, details
    assert "/" not in details.replace("a/b", ""), f"a path leaked: {details}"
    assert _state(server) == before, "a refused upload changed the registry or left a file"
    return details


def test_valid_upload_then_bad_ones(upload_server, lora_bytes):
    alice = upload_server.client("alice")
    good = lora_bytes["sd1_a"]
    info = alice.upload_adapter(good, name="good", family="sd1")
    assert (info.name, info.sha256, info.size, info.family, info.kind) == ("good", sha(good), len(good), "sd1", "lora")
    assert upload_server.core.registry.blob_path(info.sha256).read_bytes() == good

    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    # Truncated: the declared size/sha are of the whole file, half of it arrives.
    header = convert.UploadHeader("trunc", "lora", "sd1", sha(good), False, len(good))
    _refused(upload_server, lambda: alice.upload_chunks(convert.upload_chunks(header, good[: len(good) // 2])),
             INVALID, "data:", "truncated")
    # Truncated, and the header describes the truncated bytes: the file itself is broken.
    _refused(upload_server, lambda: alice.upload_adapter(good[: len(good) // 2], name="trunc2", family="sd1"),
             INVALID, "data:", "not a valid safetensors file")
    # Oversized: refused from the header, and from the bytes when the header lies about the size.
    big = good + b"\0" * (4 * len(good))
    _refused(upload_server, lambda: alice.upload_adapter(big, name="big", family="sd1"), INVALID, "header.size:", "limit")
    header = convert.UploadHeader("big", "lora", "sd1", sha(big), False, 0)
    _refused(upload_server, lambda: alice.upload_chunks(convert.upload_chunks(header, big, chunk_bytes=4096)),
             INVALID, "data:", "limit")
    # A pickle (torch.save) is never unpickled.
    buffer = io.BytesIO()
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, buffer)
    _refused(upload_server, lambda: alice.upload_adapter(buffer.getvalue(), name="pickle", family="sd1"),
             INVALID, "data:", "not a valid safetensors file")
    # Wrong family: an SD 1.x LoRA declared as SDXL does not fit the SDXL model; sd2 is not served.
    _refused(upload_server, lambda: alice.upload_adapter(good, name="wrongfam", family="sdxl"), INVALID, "data:")
    _refused(upload_server, lambda: alice.upload_adapter(good, name="wrongfam", family="sd2"), INVALID, "header.family:")
    # Wrong sha256.
    _refused(upload_server, lambda: alice.upload_adapter(good, name="badsha", family="sd1", sha256="0" * 64),
             INVALID, "header.sha256:")
    _refused(upload_server, lambda: alice.upload_adapter(good, name="badsha", family="sd1", sha256="xyz"),
             INVALID, "header.sha256:")
    # Names with path characters.
    for name in ("../escape", "a/b", "..", ".hidden", "x" * 65, "", "a\\b"):
        _refused(upload_server, lambda n=name: alice.upload_adapter(good, name=n, family="sd1"), INVALID, "header.name:")
    # Unknown kind, and a stream without a header.
    _refused(upload_server, lambda: alice.upload_adapter(good, name="k", family="sd1", kind="checkpoint"),
             INVALID, "header.kind:")
    chunks = list(convert.upload_chunks(convert.UploadHeader("h", "lora", "sd1", sha(good), False, 0), good))[1:]
    _refused(upload_server, lambda: alice.upload_chunks(iter(chunks)), INVALID, "header:")
    # After all that, the good one is still there and still the only one.
    assert [a.name for a in alice.list_adapters().adapters] == ["good"]


def test_quota(upload_server, lora_bytes):
    bob = upload_server.client("bob")
    bob.upload_adapter(lora_bytes["sd1_a"], name="one", family="sd1")
    bob.upload_adapter(lora_bytes["sd1_b"], name="two", family="sd1")
    EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
    _refused(upload_server, lambda: bob.upload_adapter(lora_bytes["sd1_a"], name="three", family="sd1"),
             EXHAUSTED, "quota", "2 adapters")
    # Replacing an existing name is within the count quota; bytes still count.
    info = bob.upload_adapter(lora_bytes["sd1_a"], name="two", family="sd1")
    assert info.sha256 == sha(lora_bytes["sd1_a"])
    # The replaced file (sd1_b) is no longer named by bob; the store dropped it unless someone else names it.
    named = {r.sha256 for r in upload_server.core.registry.list("bob")} | {
        r.sha256 for r in upload_server.core.registry.list("alice")
    }
    stored = {p.stem for p in upload_server.core.registry.files()}
    assert stored == named
    bob.delete_adapter("one")
    bob.delete_adapter("two")
    assert upload_server.core.registry.list("bob") == []


def test_byte_quota(upload_server, lora_bytes):
    admin = upload_server.client("admin")
    admin.upload_adapter(lora_bytes["sd1_a"], name="first", family="sd1")
    details = _refused(
        upload_server,
        lambda: admin.upload_adapter(lora_bytes["sd1_b"], name="second", family="sd1"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "storage quota",
    )
    print(details)
    # Replacing the one it has frees that file's bytes first.
    assert admin.upload_adapter(lora_bytes["sd1_b"], name="first", family="sd1").sha256 == sha(lora_bytes["sd1_b"])
