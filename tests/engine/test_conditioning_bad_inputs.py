"""Bad conditioning inputs are typed errors naming the field; nothing of a decoder's own message."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import pytest
import safetensors.torch
import torch
from PIL import Image

from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.controlnet import ControlSpec
from sdserve.engine.request import EmbeddingSpec, HypernetworkSpec
from sdserve.errors import AdapterError, InvalidArgument, SdserveError


def png_bytes(width: int = 32, height: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width × height (CRC fixed, so only the size is a lie)."""
    data = bytearray(png_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig())


def _error(engine, **fields) -> SdserveError:
    with pytest.raises(SdserveError) as info:
        engine.validate(RequestSpec(model="tiny-sd1", prompt="x", **fields))
    return info.value


def test_undecodable_image(engine):
    error = _error(engine, init_image=b"\x89PNG but not really")
    assert isinstance(error, InvalidArgument) and error.field == "init_image"
    assert "decodable" in str(error)


def test_header_claiming_20000_squared_is_refused_before_decoding(engine):
    error = _error(engine, init_image=png_claiming(20000, 20000))
    assert isinstance(error, InvalidArgument) and error.field == "init_image"
    assert "pixels" in str(error) and "DecompressionBomb" not in str(error)


def test_mask_of_the_wrong_size(engine):
    error = _error(engine, init_image=png_bytes(32, 32), mask=png_bytes(16, 16))
    assert error.field == "mask" and "16" in str(error) and "32" in str(error)


def test_control_image_undecodable(engine, tmp_path):
    from tests.engine.test_controlnet import make_controlnet

    net = make_controlnet("tiny-sd1", tmp_path, 0)
    error = _error(engine, controlnets=(ControlSpec(model=str(net), image=b"garbage"),))
    assert error.field == "controlnets[0].image"


def test_embedding_of_the_wrong_width(engine, tmp_path):
    path = tmp_path / "wide.safetensors"
    safetensors.torch.save_file({"<wide>": torch.zeros(1, 48)}, str(path))
    error = _error(engine, embeddings=(EmbeddingSpec(path=str(path)),))
    assert isinstance(error, AdapterError) and "48" in str(error) and "32" in str(error)
    assert str(tmp_path) not in str(error)


def test_pickle_hypernetwork_is_refused(engine, tmp_path):
    path = tmp_path / "hn.pt"
    path.write_bytes(pickle.dumps({"a": 1}))
    error = _error(engine, hypernetworks=(HypernetworkSpec(path=str(path)),))
    assert isinstance(error, AdapterError) and "sdserve adapters convert" in str(error)
    assert str(tmp_path) not in str(error)


def test_image_fields_need_an_init_image(engine):
    assert _error(engine, mask=png_bytes()).field == "mask"
    assert _error(engine, strength=0.5).field == "strength"
    assert _error(engine, init_image=png_bytes(), strength=1.5).field == "strength"
    assert _error(engine, init_image=png_bytes(), width=48).field == "width"
