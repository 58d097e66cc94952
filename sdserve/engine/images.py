"""Image inputs of a request (init image, mask, control and reference images): decode and check.

Every check that can be made from the header is made before any pixel is decoded: PIL's
`Image.open` reads only the header, so an image whose header claims more pixels than the limit
(a "decompression bomb": a few hundred bytes of PNG that claim 20000 x 20000) is refused without
allocating it. PIL's own bomb guard (which fires at open, above ~179 M pixels) is mapped to the
same error; its warning band (89-179 M) never reaches the log, since our limit is far lower.
Errors name the request field and the limit, never PIL's message.

Decoding follows diffusers' `load_image`: EXIF orientation applied, then converted to RGB.
"""

from __future__ import annotations

import io
import struct
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdserve.errors import InvalidArgument

FORMATS = ("PNG", "JPEG")
NOT_AN_IMAGE = "is not a decodable PNG or JPEG image"
# Orientations (EXIF tag 0x0112) that exif_transpose turns by 90 degrees, swapping width and height.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def _too_large(field: str, max_pixels: int, size: tuple[int, int] | None = None) -> InvalidArgument:
    claimed = f" ({size[0]}x{size[1]} = {size[0] * size[1]} pixels)" if size else ""
    return InvalidArgument(f"image is larger than the limit of {max_pixels} pixels{claimed}", field=field)


def _claimed_size(data: bytes) -> tuple[int, int] | None:
    """The size a PNG/JPEG header claims, read by the format plugins directly (header only, and
    without PIL's bomb guard, which lives in `Image.open`)."""
    from PIL.JpegImagePlugin import JpegImageFile
    from PIL.PngImagePlugin import PngImageFile

    for plugin in (PngImageFile, JpegImageFile):
        try:
            return plugin(io.BytesIO(data)).size
        except Exception:  # any failure means "not this format"
            continue
    return None


def _open(data: bytes, field: str) -> tuple[Image.Image | None, tuple[int, int] | None]:
    """(the image with only its header read, its size); PNG or JPEG only. For a header past
    PIL's bomb guard the image is None and the size the header claims (if readable)."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise InvalidArgument(NOT_AN_IMAGE, field=field)
    data = bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        return None, _claimed_size(data)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, EOFError):
        raise InvalidArgument(NOT_AN_IMAGE, field=field) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidArgument(NOT_AN_IMAGE, field=field)
    return image, image.size


def _decode(image: Image.Image, field: str, mode: str) -> Image.Image:
    """Decode the pixels (after the header checks), apply EXIF orientation, convert to `mode`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            oriented = ImageOps.exif_transpose(image)
            return oriented.convert(mode)
    except Image.DecompressionBombError:  # pragma: no cover - the header check comes first
        raise InvalidArgument(NOT_AN_IMAGE, field=field) from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, KeyError, IndexError, struct.error):
        raise InvalidArgument(NOT_AN_IMAGE, field=field) from None


def decode_image(data: bytes, field: str, *, max_pixels: int) -> Image.Image:
    """PNG or JPEG bytes -> RGB image; more than `max_pixels` (width x height, from the header)
    or undecodable bytes -> InvalidArgument naming `field`."""
    image, size = _open(data, field)
    if image is None or size is None or size[0] * size[1] > max_pixels:
        raise _too_large(field, max_pixels, size)
    return _decode(image, field, "RGB")


def decode_mask(data: bytes, field: str, size: tuple[int, int]) -> Image.Image:
    """PNG or JPEG bytes -> L-mode mask (white = repaint) of exactly `size` (width, height).

    A colour or RGBA mask is reduced to its luminance (PIL's convert("L"), as diffusers does).
    """
    expected_width, expected_height = size
    image, size = _open(data, field)
    if size is None:
        raise _too_large(field, expected_width * expected_height)
    # The pixel count is orientation-free: checked before decoding, the exact size after it.
    if image is None or size[0] * size[1] != expected_width * expected_height:
        raise InvalidArgument(f"mask is {size[0]}x{size[1]}, the image is {expected_width}x{expected_height}",
                              field=field)
    mask = _decode(image, field, "L")
    if mask.size != (expected_width, expected_height):
        raise InvalidArgument(f"mask is {mask.width}x{mask.height}, the image is {expected_width}x{expected_height}",
                              field=field)
    return mask


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges as diffusers' ControlNet examples make them: `cv2.Canny` on the RGB array
    (OpenCV takes the strongest channel gradient), the edge map repeated to 3 channels (RGB)."""
    if not (0 <= low <= high):
        raise InvalidArgument(f"thresholds must satisfy 0 <= low <= high (got {low}, {high})", field="canny")
    pixels = np.asarray(image.convert("RGB"))  # [H, W, 3] uint8
    edges = cv2.Canny(pixels, low, high)  # [H, W] uint8, 0 or 255
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def outpaint_canvas(
    image: Image.Image, left: int, top: int, right: int, bottom: int, *, max_pixels: int | None = None,
    field: str = "outpaint",
) -> tuple[Image.Image, Image.Image]:
    """Grow `image` by the margins, filling the new area by edge replication (numpy pad "edge");
    -> (canvas RGB, mask L: 255 on the new area, 0 on the original pixels).

    The canvas's width and height must be multiples of 8 (the VAE's factor); `max_pixels`, if
    given, bounds the canvas before it is allocated.
    """
    margins = (left, top, right, bottom)
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in margins):
        raise InvalidArgument(f"margins must be integers >= 0 (got {list(margins)})", field=field)
    if not any(margins):
        raise InvalidArgument("at least one margin must be positive", field=field)
    width, height = image.width + left + right, image.height + top + bottom
    if width % 8 or height % 8:
        raise InvalidArgument(f"the grown canvas is {width}x{height}; width and height must be multiples of 8",
                              field=field)
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidArgument(f"the grown canvas ({width}x{height}) exceeds {max_pixels} pixels", field=field)
    pixels = np.asarray(image.convert("RGB"))  # [h, w, 3] uint8
    canvas = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")  # [H, W, 3]
    mask = np.full((height, width), 255, dtype=np.uint8)  # [H, W]
    mask[top : top + image.height, left : left + image.width] = 0
    return Image.fromarray(canvas), Image.fromarray(mask)
