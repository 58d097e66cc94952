"""Output files of `sdserve generate`: PNG (default), JPEG or WebP, each carrying the request.

PNG keeps the A1111 `parameters` text chunk (engine/png.py). JPEG and WebP have no text chunks:
A1111 writes the same text into EXIF UserComment (piexif's "UNICODE" form), and so do we, so
tools that read A1111's JPEGs read ours.
"""

from __future__ import annotations

import argparse
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy stays out of `sdserve generate --help`'s start-up
    import numpy as np

FORMATS = ("png", "jpeg", "webp")
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
DEFAULT_QUALITY = 90
_EXIF_IFD = 0x8769  # the Exif sub-IFD, where UserComment lives
_USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"  # EXIF's character-code field; piexif writes UTF-16 big-endian after it


def user_comment(parameters: str) -> bytes:
    """The EXIF UserComment bytes A1111 writes for `parameters`."""
    return _UNICODE_PREFIX + parameters.encode("utf-16-be")


def read_user_comment(raw: bytes) -> str:
    """`user_comment`'s inverse (ASCII-prefixed comments too)."""
    if raw.startswith(_UNICODE_PREFIX):
        return raw[len(_UNICODE_PREFIX):].decode("utf-16-be")
    return raw[8:].decode("ascii", errors="replace")


def encode_image(image: np.ndarray, parameters: str, fmt: str = "png", quality: int = DEFAULT_QUALITY) -> bytes:
    """uint8 [H, W, 3] -> the bytes of a `fmt` file carrying `parameters` (none when it is empty).

    `quality` (1-100) is PIL's for JPEG and lossy WebP; PNG is lossless and ignores it."""
    if fmt == "png":
        from sdserve.engine.png import encode_png

        return encode_png(image, parameters)
    if fmt not in SUFFIXES:
        raise ValueError(f"format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    from PIL import Image

    exif = Image.Exif()
    if parameters:
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = user_comment(parameters)
    buffer = io.BytesIO()
    # JPEG at 4:4:4: PIL's default 4:2:0 halves colour resolution, which costs small generated images
    # (64 px, per-pixel colour noise) ~20/255 where 4:4:4 at quality 100 costs ~1.
    options = {"subsampling": 0} if fmt == "jpeg" else {}
    Image.fromarray(image).save(buffer, format=fmt.upper(), quality=quality, exif=exif.tobytes(), **options)
    return buffer.getvalue()


def add_format_flags(group: argparse._ArgumentGroup) -> None:
    """--format and --quality, the same for `sdserve generate` and `sdserve client generate`."""
    group.add_argument("--format", choices=FORMATS, default="png",
                       help="output file format: png (lossless, A1111 'parameters' text chunk), jpeg or webp (the "
                       "same text in EXIF UserComment, as A1111 writes it); --out-dir files get .png/.jpg/.webp "
                       "(default: %(default)s)")
    group.add_argument("--quality", type=int, metavar="Q",
                       help=f"JPEG/WebP quality, 1-100 (default {DEFAULT_QUALITY}; only with --format jpeg or webp)")


def checked_quality(args: argparse.Namespace) -> int:
    """The JPEG/WebP quality to write with; one line and exit 2 for a bad --quality."""
    from sdserve.cli.common import fail

    if args.quality is None:
        return DEFAULT_QUALITY
    if args.format == "png":
        fail("--quality: only with --format jpeg or webp (PNG is lossless)")
    if not 1 <= args.quality <= 100:
        fail(f"--quality: must be 1-100 (got {args.quality})")
    return args.quality


def reencode_png(data: bytes, fmt: str, quality: int = DEFAULT_QUALITY) -> bytes:
    """PNG bytes (a server's image) -> the same pixels as a `fmt` file, its `parameters` chunk carried
    over; PNG stays the server's bytes. PIL only: the client imports no engine module."""
    if fmt == "png":
        return data
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        parameters = str(image.info.get("parameters", ""))
        pixels = np.asarray(image.convert("RGB"))  # uint8 [H, W, 3]
    return encode_image(pixels, parameters, fmt, quality)
