"""Image inputs: header-first size checks, decode errors, masks, Canny, outpaint canvases."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from sdserve.engine import images
from sdserve.engine.images import canny, decode_image, decode_mask, outpaint_canvas
from sdserve.errors import InvalidArgument


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _gradient(width: int = 16, height: int = 8) -> Image.Image:
    x = np.arange(width, dtype=np.uint8)[None, :].repeat(height, 0) * 10
    y = np.arange(height, dtype=np.uint8)[:, None].repeat(width, 1) * 20
    return Image.fromarray(np.stack([x, y, x // 2 + y // 2], axis=-1))  # [H, W, 3]


def _png_claiming(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose IHDR now claims width x height (CRC fixed, pixel data unchanged)."""
    data = bytearray(_encode(Image.new("RGB", (8, 8), "red")))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(_encode(Image.new("RGB", (8, 8), "blue"), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# --- decode_image -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decodes_png_and_jpeg_to_rgb(fmt):
    source = _gradient()
    decoded = decode_image(_encode(source, fmt, quality=100, subsampling=0) if fmt == "JPEG" else _encode(source), "init_image",
                           max_pixels=1000)
    assert decoded.mode == "RGB" and decoded.size == (16, 8)
    tolerance = 0 if fmt == "PNG" else 8
    assert np.abs(np.asarray(decoded, dtype=int) - np.asarray(source, dtype=int)).max() <= tolerance


def test_rgba_and_grey_become_rgb():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert decode_image(_encode(rgba), "f", max_pixels=64).getpixel((0, 0)) == (10, 20, 30)
    grey = Image.new("L", (8, 8), 77)
    assert decode_image(_encode(grey), "f", max_pixels=64).getpixel((3, 3)) == (77, 77, 77)


def test_exif_orientation_is_applied_like_diffusers_load_image():
    from diffusers.utils import load_image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _encode(_gradient(16, 8), "JPEG", exif=exif, quality=100)
    decoded = decode_image(data, "f", max_pixels=1000)
    oracle = load_image(Image.open(io.BytesIO(data)))
    assert decoded.size == (8, 16) == oracle.size
    assert np.array_equal(np.asarray(decoded), np.asarray(oracle))


@pytest.mark.parametrize("claim", [_png_claiming, _jpeg_claiming], ids=["png", "jpeg"])
def test_bomb_header_is_refused_with_our_message(claim):
    data = claim(20000, 20000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning may escape either
        with pytest.raises(InvalidArgument) as info:
            decode_image(data, "controlnets[0].image", max_pixels=2048 * 2048)
    error = info.value
    assert error.field == "controlnets[0].image"
    assert "limit of 4194304 pixels" in str(error)
    assert "decompression" not in str(error).lower() and "DOS" not in str(error)


@pytest.mark.parametrize("side", [3000, 10000])  # below PIL's guard, and in its warning band
def test_size_is_checked_before_any_pixel_is_decoded(side):
    data = _png_claiming(side, side)  # its pixel data is for 8x8: decoding it would fail differently
    with mock.patch.object(Image.Image, "load", side_effect=AssertionError("decoded")), \
            mock.patch("PIL.ImageFile.ImageFile.load", side_effect=AssertionError("decoded")), \
            warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidArgument, match=rf"limit of 1000000 pixels \({side}x{side} = {side * side} pixels\)"):
            decode_image(data, "init_image", max_pixels=1_000_000)


def test_limit_is_inclusive():
    assert decode_image(_encode(Image.new("RGB", (8, 8))), "f", max_pixels=64).size == (8, 8)
    with pytest.raises(InvalidArgument, match="limit of 63 pixels"):
        decode_image(_encode(Image.new("RGB", (8, 8))), "f", max_pixels=63)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world",
        _encode(_gradient())[:45],  # truncated inside IDAT
        _encode(Image.new("RGB", (8, 8)), "GIF"),  # decodable, but not PNG/JPEG
        _encode(Image.new("RGB", (8, 8)), "BMP"),
    ],
    ids=["empty", "text", "truncated", "gif", "bmp"],
)
def test_undecodable_bytes(data):
    with pytest.raises(InvalidArgument) as info:
        decode_image(data, "ip_adapters[1].image", max_pixels=1000)
    assert info.value.field == "ip_adapters[1].image"
    assert str(info.value) == "ip_adapters[1].image: is not a decodable PNG or JPEG image"


# --- decode_mask --------------------------------------------------------------------------------


def test_mask_is_l_mode_of_the_same_size():
    mask = Image.new("RGB", (16, 8), "white")
    decoded = decode_mask(_encode(mask), "mask", (16, 8))
    assert decoded.mode == "L" and decoded.size == (16, 8) and decoded.getpixel((0, 0)) == 255


@pytest.mark.parametrize("size", [(8, 16), (16, 16), (16000, 16000)])
def test_mask_of_another_size_names_both(size):
    data = _png_claiming(*size) if size[0] > 100 else _encode(Image.new("L", size))
    with pytest.raises(InvalidArgument) as info:
        decode_mask(data, "mask", (16, 8))
    message = str(info.value)
    assert info.value.field == "mask"
    assert f"{size[0]}x{size[1]}" in message and "16x8" in message


# --- canny --------------------------------------------------------------------------------------


def test_canny_finds_a_sharp_edge_and_keeps_flat_areas_black():
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, 16:] = 200  # one vertical step between columns 15 and 16
    edges = np.asarray(canny(Image.fromarray(pixels)))
    assert edges.shape == (32, 32, 3) and set(np.unique(edges)) == {0, 255}
    assert np.array_equal(edges[..., 0], edges[..., 1]) and np.array_equal(edges[..., 0], edges[..., 2])
    edge_columns = set(np.nonzero(edges[..., 0].any(axis=0))[0])
    assert edge_columns <= {15, 16} and edge_columns
    assert edges[2:-2, :13].max() == 0 and edges[2:-2, 19:].max() == 0


def test_canny_thresholds_matter():
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, 16:] = 12  # a faint step: gradient below the default thresholds
    image = Image.fromarray(pixels)
    assert np.asarray(canny(image)).max() == 0
    assert np.asarray(canny(image, low=10, high=20)).max() == 255


def test_canny_equals_the_diffusers_example_recipe():
    import cv2

    image = _gradient(32, 32).resize((64, 64), Image.NEAREST)
    recipe = cv2.Canny(np.array(image), 100, 200)[:, :, None]
    recipe = np.concatenate([recipe, recipe, recipe], axis=2)
    assert np.array_equal(np.asarray(canny(image)), recipe)
    with pytest.raises(InvalidArgument):
        canny(image, low=50, high=10)


# --- outpaint_canvas ----------------------------------------------------------------------------


def test_outpaint_replicates_edges_and_masks_the_new_area():
    source = _gradient(16, 8)
    canvas, mask = outpaint_canvas(source, left=8, top=0, right=0, bottom=8)
    pixels, original = np.asarray(canvas), np.asarray(source)
    assert canvas.size == (24, 16) and canvas.mode == "RGB" and mask.mode == "L" and mask.size == (24, 16)
    assert np.array_equal(pixels[0:8, 8:24], original)  # the original, in place
    for row in range(8):  # left margin: each row repeats its first pixel
        assert (pixels[row, :8] == original[row, 0]).all()
    for row in range(8, 16):  # bottom margin: repeats the last row (and the corner its corner)
        assert np.array_equal(pixels[row, 8:], original[-1])
        assert (pixels[row, :8] == original[-1, 0]).all()
    mask_pixels = np.asarray(mask)
    assert mask_pixels[0:8, 8:24].max() == 0
    assert (mask_pixels[:, :8] == 255).all() and (mask_pixels[8:, :] == 255).all()


def test_outpaint_validates_sizes_and_margins():
    source = _gradient(16, 8)
    with pytest.raises(InvalidArgument, match="the grown canvas is 19x8; width and height must be multiples of 8"):
        outpaint_canvas(source, 3, 0, 0, 0)
    with pytest.raises(InvalidArgument, match="margins must be integers >= 0"):
        outpaint_canvas(source, -8, 0, 0, 0)
    with pytest.raises(InvalidArgument, match="at least one margin"):
        outpaint_canvas(source, 0, 0, 0, 0)
    with mock.patch.object(images.np, "pad", side_effect=AssertionError("allocated")), \
            pytest.raises(InvalidArgument, match=r"exceeds 1000 pixels") as info:
        outpaint_canvas(source, 16, 16, 16, 16, max_pixels=1000)
    assert info.value.field == "outpaint"
