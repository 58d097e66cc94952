"""Textual-inversion embeddings and hypernetworks over gRPC: uploaded by kind, used by name,
each image equal to the in-process engine's with the same files."""

from __future__ import annotations

import io

import grpc
import pytest
import safetensors.torch
import torch

from tests.server.conftest import MODEL, max_diff, png_pixels, reference_images, sha


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """(bytes, path) of an embedding and a hypernetwork for tiny-sd1."""
    from sdserve.adapters.convert import convert_file
    from tests.adapters.test_hypernetwork import a1111_hypernetwork

    directory = tmp_path_factory.mktemp("ti-hn")
    embedding = directory / "cat-toy.safetensors"
    safetensors.torch.save_file({"<cat-toy>": torch.randn(3, 32, generator=torch.Generator().manual_seed(1))},
                                str(embedding))
    saved, _ = a1111_hypernetwork([32, 64], [1, 2, 1], "relu", False, False)
    torch.save(saved, directory / "hn.pt")
    convert_file(directory / "hn.pt", directory / "hn.safetensors")
    return {name: (path.read_bytes(), path) for name, path in
            (("embedding", embedding), ("hypernetwork", directory / "hn.safetensors"))}


def test_embedding_and_hypernetwork_by_name(server, reference_engine, files):
    client = server.client("alice")
    for kind, (data, _path) in files.items():
        info = client.upload_adapter(data, name=f"my-{kind}", family="sd1", kind=kind)
        assert (info.kind, info.sha256) == (kind, sha(data))
    request = {"model": MODEL, "prompt": "a <cat-toy> on a table", "seed": 4, "steps": 3,
               "embeddings": [{"name": "my-embedding"}], "hypernetworks": [{"name": "my-hypernetwork", "strength": 0.7}]}
    response = client.generate(request, timeout=60)
    assert [(u.name, u.kind, u.sha256) for u in response.adapters] == [
        ("my-embedding", "embedding", sha(files["embedding"][0])),
        ("my-hypernetwork", "hypernetwork", sha(files["hypernetwork"][0])),
    ]
    local = {**request, "embeddings": [{"path": str(files["embedding"][1])}],
             "hypernetworks": [{"path": str(files["hypernetwork"][1]), "strength": 0.7}]}
    want = reference_images(reference_engine, local)[0]
    assert max_diff(png_pixels(response.images[0].png), want) <= 2
    plain = reference_images(reference_engine, {k: v for k, v in request.items()
                                                if k not in ("embeddings", "hypernetworks")})[0]
    assert max_diff(want, plain) > 2


def test_kinds_and_paths_are_checked(server, files):
    client = server.client("alice")
    client.upload_adapter(files["embedding"][0], name="only-an-embedding", family="sd1", kind="embedding")
    cases = [
        ({"adapters": [{"name": "only-an-embedding"}]}, grpc.StatusCode.INVALID_ARGUMENT, "adapters[0].name:"),
        ({"embeddings": [{"path": str(files["embedding"][1])}]}, grpc.StatusCode.INVALID_ARGUMENT, "embeddings[0].path:"),
        ({"hypernetworks": [{"name": "nope"}]}, grpc.StatusCode.NOT_FOUND, "hypernetworks[0].name:"),
    ]
    for extra, code, prefix in cases:
        with pytest.raises(grpc.RpcError) as info:
            client.generate({"model": MODEL, "prompt": "x", "steps": 1, **extra}, timeout=30)
        assert info.value.code() == code and info.value.details().startswith(prefix), info.value.details()
    # A LoRA file is not an embedding: refused at upload, naming the problem.
    buffer = io.BytesIO(safetensors.torch.save({"x.lora_A.weight": torch.zeros(2, 2)}))
    with pytest.raises(grpc.RpcError) as info:
        client.upload_adapter(buffer.getvalue(), name="not-ti", family="sd1", kind="embedding")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("data:")
