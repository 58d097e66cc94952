"""Captioned folders: both layouts, resize and crop, and a one-line error for each bad input."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from sdserve.errors import InvalidArgument
from sdserve.trainers.data import load_folder, load_masks, square
from tests.trainers.conftest import write_folder


def test_kohya_layout_reads_captions_in_sorted_order(tmp_path):
    folder = write_folder(tmp_path / "d", count=3, size=(32, 32))
    data = load_folder(folder, 32)
    assert data.files == ("img0.png", "img1.png", "img2.png")
    assert data.captions == ("a photo of sks dog 0", "a photo of sks dog 1", "a photo of sks dog 2")
    assert data.images.shape == (3, 3, 32, 32) and data.images.dtype.is_floating_point is False
    # At the resolution already: the pixels are the file's, untouched.
    expected = np.asarray(Image.open(folder / "img1.png"))  # [H, W, 3]
    assert np.array_equal(data.images[1].permute(1, 2, 0).numpy(), expected)


def test_imagefolder_layout_and_caption_flag(tmp_path):
    folder = write_folder(tmp_path / "d", count=2, size=(32, 32), layout="imagefolder", caption="a red cat")
    data = load_folder(folder, 32)
    assert data.captions == ("a red cat 0", "a red cat 1")
    assert load_folder(folder, 32, caption="sks").captions == ("sks", "sks")


def test_other_sizes_are_resized_by_the_shorter_side_and_center_cropped(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    # 32 wide, 40 tall: the shorter side is already 32, so only the crop applies: rows 4..36.
    rows, columns = np.mgrid[0:40, 0:32]
    pixels = np.stack([rows * 6, columns * 7, rows * 3 + columns * 3], axis=-1).astype(np.uint8)  # [40, 32, 3] smooth
    Image.fromarray(pixels).save(folder / "tall.png")
    (folder / "tall.txt").write_text("x")
    # 64 x 80 halves to 32 x 40 and is cropped the same way.
    big = np.kron(pixels, np.ones((2, 2, 1), dtype=np.uint8))  # [80, 64, 3], each pixel 2x2
    Image.fromarray(big).save(folder / "wide.webp", lossless=True)
    (folder / "wide.txt").write_text("y")
    data = load_folder(folder, 32)
    assert data.files == ("tall.png", "wide.webp")
    assert np.array_equal(data.images[0].permute(1, 2, 0).numpy(), pixels[4:36])
    halved = data.images[1].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(halved - pixels[4:36].astype(int)).max() <= 8  # Lanczos of 2x2 blocks of a smooth image: close, not exact
    assert square(Image.new("RGB", (10, 30)), 8).size == (8, 8)


def test_jpeg_loads(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / "a.jpg", quality=95)
    (folder / "a.txt").write_text("red")
    image = load_folder(folder, 16).images[0]  # [3, 16, 16]
    assert abs(int(image[0].float().mean()) - 200) <= 3 and int(image[1].float().mean()) <= 15


def _error(callable_, *args, **kwargs) -> str:
    with pytest.raises(InvalidArgument) as raised:
        callable_(*args, **kwargs)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_masks_pair_by_name_stem_and_are_cropped_like_their_images(tmp_path):
    folder = write_folder(tmp_path / "d", count=2, size=(16, 16))
    masks = tmp_path / "m"
    masks.mkdir()
    wide = np.zeros((16, 32), np.uint8)
    wide[:, 16:24] = 255  # the center crop keeps columns 8..23: its right half is white
    Image.fromarray(wide).save(masks / "img0.png")
    Image.fromarray(np.full((16, 16, 3), 64, np.uint8)).save(masks / "img1.jpg")
    data = load_masks(masks, load_folder(folder, 8))
    assert data.masks.shape == (2, 1, 8, 8) and data.masks.dtype == torch.float32
    left, right = data.masks[0, 0, :, :4], data.masks[0, 0, :, 4:]  # up to the resize filter's ringing
    assert float(left.max()) < 0.1 and float(right.min()) > 0.9
    assert torch.allclose(data.masks[1], torch.full((1, 8, 8), 64 / 255), atol=2 / 255)  # JPEG, greyscale

    (masks / "img1.jpg").unlink()
    assert _error(load_masks, masks, data).startswith("--mask-data: no mask for img1.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(masks / "img1.png")
    message = _error(load_masks, masks, data)
    assert message.startswith(str(masks / "img1.png")) and "all black" in message
    assert "is not a directory" in _error(load_masks, tmp_path / "nope", data)


def test_missing_and_empty_folders(tmp_path):
    assert "--data" in _error(load_folder, tmp_path / "nope", 32)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    message = _error(load_folder, tmp_path / "empty", 32)
    assert message.startswith("--data:") and "no PNG, JPEG or WebP" in message
    assert _error(load_folder, tmp_path / "empty", 32, flag="--reg-data").startswith("--reg-data:")


def test_image_without_caption_is_named(tmp_path):
    folder = write_folder(tmp_path / "d", count=2, size=(16, 16))
    (folder / "img1.txt").unlink()
    message = _error(load_folder, folder, 16)
    assert "img1.png" in message and "--caption" in message
    assert load_folder(folder, 16, caption="sks").captions == ("sks", "sks")


def test_unreadable_image_is_named(tmp_path):
    folder = write_folder(tmp_path / "d", count=1, size=(16, 16))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "broken.txt").write_text("x")
    message = _error(load_folder, folder, 16)
    assert "broken.png" in message and "not a decodable" in message


def _png_header_claiming(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose IHDR claims width x height: a decompression bomb's header."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_images_too_large_are_refused_from_the_header(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(_png_header_claiming(30000, 30000))
    (folder / "bomb.txt").write_text("x")
    message = _error(load_folder, folder, 16)
    assert "bomb.png" in message and "larger than the limit" in message
    # The limit applies to WebP too (header read only), and is a parameter.
    (folder / "bomb.png").unlink()
    Image.new("RGB", (64, 64)).save(folder / "big.webp")
    (folder / "big.txt").write_text("x")
    assert "big.webp" in _error(load_folder, folder, 16, max_pixels=1000)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('["img0.png", "x"]', "JSON object"),
        ('{"text": "x"}', "file_name"),
        ('{"file_name": "img0.png"}', "text must be a string"),
        ('{"file_name": "missing.png", "text": "x"}', "not a file"),
        ('{"file_name": "../outside.png", "text": "x"}', "not a file"),
    ],
)
def test_bad_metadata_lines_are_named_by_line(tmp_path, line, problem):
    folder = write_folder(tmp_path / "d", count=1, size=(16, 16), layout="imagefolder")
    Image.new("RGB", (16, 16)).save(tmp_path / "outside.png")
    with (folder / "metadata.jsonl").open("a") as handle:
        handle.write("\n" + line + "\n")
    message = _error(load_folder, folder, 16)
    assert "metadata.jsonl line 3" in message and problem in message


def test_metadata_may_name_images_in_subfolders(tmp_path):
    folder = tmp_path / "d"
    (folder / "train").mkdir(parents=True)
    Image.new("RGB", (16, 16), (0, 0, 255)).save(folder / "train" / "b.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "train/b.png", "text": "blue"}) + "\n")
    data = load_folder(folder, 16)
    assert data.files == ("train/b.png",) and data.captions == ("blue",)
    assert int(data.images[0, 2].min()) == 255
