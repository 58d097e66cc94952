"""Image inputs over gRPC: ControlNets by operator-registered name only, init images as bytes."""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.server.conftest import MODEL, ServerThread, make_config, max_diff, png_pixels, reference_images


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    from tests.engine.test_controlnet import make_controlnet

    return make_controlnet(MODEL, tmp_path_factory.mktemp("cn"), 1)


@pytest.fixture(scope="module")
def ip_dir(tmp_path_factory):
    from tests.engine.test_ip_adapter import make_ip_adapter

    return make_ip_adapter(MODEL, tmp_path_factory.mktemp("ip"))


@pytest.fixture(scope="module")
def cn_server(tmp_path_factory, controlnet_dir, ip_dir):
    config = make_config(tmp_path_factory.mktemp("cn-registry"))
    models = replace(config.models, controlnets={"edges": str(controlnet_dir)}, ip_adapters={"face": str(ip_dir)})
    config = replace(config, models=models)
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def _image() -> str:
    """A 32x32 PNG with a block in it (base64, as JSON carries bytes)."""
    array = np.zeros((32, 32, 3), dtype=np.uint8)
    array[:] = (40, 120, 200)
    array[8:16, 8:24] = (250, 200, 20)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_controlnet_by_registered_name_matches_the_engine(cn_server, reference_engine, controlnet_dir):
    request = {"model": MODEL, "prompt": "a dog", "seed": 2, "steps": 3,
               "controlnets": [{"model": "edges", "image": _image(), "scale": 0.8}]}
    response = cn_server.client().generate(request, timeout=60)
    local = {**request, "controlnets": [{**request["controlnets"][0], "model": str(controlnet_dir)}]}
    want = reference_images(reference_engine, local)[0]
    assert max_diff(png_pixels(response.images[0].png), want) <= 2
    plain = reference_images(reference_engine, {k: v for k, v in request.items() if k != "controlnets"})[0]
    assert max_diff(want, plain) > 2  # the unit mattered


def test_controlnet_directory_from_a_client_is_refused(cn_server, controlnet_dir):
    request = {"model": MODEL, "prompt": "a dog", "steps": 2,
               "controlnets": [{"model": str(controlnet_dir), "image": _image()}]}
    with pytest.raises(grpc.RpcError) as info:
        cn_server.client().generate(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details().startswith("controlnets[0].model:")
    assert str(controlnet_dir) not in info.value.details()


def test_img2img_over_grpc_matches_the_engine(cn_server, reference_engine):
    request = {"model": MODEL, "prompt": "a house", "seed": 5, "steps": 4, "init_image": _image(), "strength": 0.6}
    response = cn_server.client().generate(request, timeout=60)
    assert max_diff(png_pixels(response.images[0].png), reference_images(reference_engine, request)[0]) <= 2


def test_ip_adapter_by_registered_name_and_paths_refused(cn_server, reference_engine, ip_dir):
    request = {"model": MODEL, "prompt": "a cat", "seed": 3, "steps": 3,
               "ip_adapters": [{"model": "face", "image": _image(), "scale": 0.7}]}
    response = cn_server.client().generate(request, timeout=60)
    local = {**request, "ip_adapters": [{**request["ip_adapters"][0], "model": str(ip_dir)}]}
    assert max_diff(png_pixels(response.images[0].png), reference_images(reference_engine, local)[0]) <= 2
    with pytest.raises(grpc.RpcError) as info:
        cn_server.client().generate(local, timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details().startswith("ip_adapters[0].model:") and str(ip_dir) not in info.value.details()
