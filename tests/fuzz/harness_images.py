"""Image inputs: bytes -> the decoding every image field of a request goes through.

init_image, ControlNet and IP-Adapter images are decoded by `decode_image` (under the pixel
limit of the default model and of the tiny ones); masks by `decode_mask` against the size of
their init image; ControlNet's canny preprocess and outpainting then work on what was decoded.
"""

from __future__ import annotations

from pathlib import Path

from tests.fuzz.common import typed_errors_only

# PIL's PNG and JPEG plugins, EXIF reader and ImageOps are Python: their branches are the
# decoding paths, so they are instrumented too (the C codecs below them are not).
INSTRUMENT = ("sdserve", "PIL")
MODULES = (
    "sdserve.engine.images",
    "PIL.Image",
    "PIL.ImageFile",
    "PIL.ImageOps",
    "PIL.PngImagePlugin",
    "PIL.JpegImagePlugin",
    "PIL.MpoImagePlugin",
    "PIL.TiffImagePlugin",
    "PIL.TiffTags",
)

# The limits of the built-in models: the default (ModelLimits) and the tiny ones (TINY_LIMITS).
MAX_PIXELS = (2048 * 2048, 256 * 256)


def setup(workdir: Path) -> None:
    """Nothing to prepare: decoding needs no model."""


def one_input(data: bytes) -> None:
    from sdserve.engine.images import canny, decode_image, decode_mask, outpaint_canvas

    decoded = []

    def decode(max_pixels: int) -> None:
        decoded.append(decode_image(data, "init_image", max_pixels=max_pixels))

    for max_pixels in MAX_PIXELS:
        typed_errors_only(lambda max_pixels=max_pixels: decode(max_pixels))
    # A mask is checked against its init image's size; try the size it must have to be decoded
    # (the input's own, when it is an image) and a size it cannot have.
    size = decoded[0].size if decoded else (32, 32)
    typed_errors_only(lambda: decode_mask(data, "mask", size))
    typed_errors_only(lambda: decode_mask(data, "mask", (size[1] + 8, size[0])))
    if decoded:
        image = decoded[-1]
        typed_errors_only(lambda: canny(image))
        # Margins that make the canvas a multiple of 8 when they can, so the pad itself runs.
        right, bottom = -image.width % 8, -image.height % 8
        typed_errors_only(lambda: outpaint_canvas(image, 8, 0, right, bottom, max_pixels=MAX_PIXELS[1]))
