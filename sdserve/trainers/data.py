"""Captioned image folders, as users already have them, read into one tensor.

Two layouts, as the trainers people use write them:

- kohya sd-scripts: `NAME.png` (or .jpg/.jpeg/.webp) with its caption in `NAME.txt` beside it;
- diffusers imagefolder: a `metadata.jsonl` whose lines are `{"file_name": ..., "text": ...}`.

A caption comes from `caption` (one for every image, e.g. "a photo of sks dog"), else the
image's metadata.jsonl line, else its .txt file; an image with none is an error. Images are
decoded with the server's header checks (a header that claims more than MAX_PIXELS is refused
before any pixel is decoded; see engine/images.py), turned by their EXIF orientation, resized so
the shorter side is the resolution and center-cropped to a square, as diffusers' and kohya's
training scripts do without bucketing. Errors are one line naming the file or flag.

The folder is read in sorted file order, so a dataset (and a run on it) does not depend on the
order the filesystem lists files in.

Loss masks (`--mask-data DIR`, kohya's masked loss): one greyscale image per training image, same
name stem, resized and cropped as the image is; white counts fully in the loss, black not at
all. `train data shapes --conditioning mask --layout imagefolder` writes such masks (the shapes
white on black) to DIR/conditioning.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sdserve.engine.images import decode_image
from sdserve.errors import InvalidArgument

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILE = "metadata.jsonl"
# Decoded at 3 bytes a pixel, 64 M pixels is ~200 MB for one image while it is resized: larger
# than any camera's output (a 100 MP sensor is ~1.6x), far below PIL's own bomb guard (179 M).
MAX_PIXELS = 64 * 1024 * 1024
MAX_CAPTION_CHARS = 10_000  # a CLIP prompt is 77 tokens; a longer .txt is not a caption


@dataclass(frozen=True)
class CaptionedImages:
    """A folder's images, square and at one resolution, with their captions."""

    images: torch.Tensor  # [N, 3, R, R] uint8
    captions: tuple[str, ...]  # [N]
    files: tuple[str, ...]  # [N] paths relative to `root`, to name an image in messages
    root: Path
    # [N, 1, R, R] float32 in [0, 1]: loss weights (see load_masks); keyword-only so subclasses
    # (controlnet_data's triplets) may add fields without defaults
    masks: torch.Tensor | None = field(default=None, kw_only=True)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])


def _decode_webp(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """WebP with the same header-first checks as engine.images.decode_image (PNG/JPEG only)."""
    not_an_image = InvalidArgument("is not a decodable PNG, JPEG or WebP image", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["WEBP"])
    except Image.DecompressionBombError:
        raise InvalidArgument(f"image is larger than the limit of {max_pixels} pixels", field=field) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, EOFError):
        raise not_an_image from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidArgument(f"image is larger than the limit of {max_pixels} pixels "
                              f"({width}x{height} = {width * height} pixels)", field=field)
    try:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, KeyError, IndexError):
        raise not_an_image from None


def read_image(file: Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB image; InvalidArgument naming the file when it is unreadable or too large."""
    try:
        data = file.read_bytes()
    except OSError as error:
        raise InvalidArgument(f"cannot read ({error.strerror or error})", field=str(file)) from None
    if file.suffix.lower() == ".webp":
        return _decode_webp(data, str(file), max_pixels)
    return decode_image(data, str(file), max_pixels=max_pixels)


def square(image: Image.Image, side: int) -> Image.Image:
    """Resize so the shorter side is `side` (Lanczos), then crop the center `side` x `side`."""
    width, height = image.size
    if min(width, height) != side:
        scale = side / min(width, height)
        size = (max(side, round(width * scale)), max(side, round(height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _metadata_captions(folder: Path) -> dict[str, str]:
    """file_name -> text from the folder's metadata.jsonl (empty when there is none)."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    captions: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"cannot read ({error})", field=str(path)) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise InvalidArgument("not valid JSON", field=where) from None
        if not isinstance(entry, dict):
            raise InvalidArgument("expected a JSON object with file_name and text", field=where)
        name, text = entry.get("file_name"), entry.get("text")
        if not isinstance(name, str) or not name:
            raise InvalidArgument("file_name must be a non-empty string", field=where)
        if not isinstance(text, str):
            raise InvalidArgument("text must be a string", field=where)
        file = (folder / name).resolve()
        if not file.is_relative_to(folder.resolve()) or not file.is_file():
            raise InvalidArgument(f"file_name {name!r} is not a file in {folder}", field=where)
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            raise InvalidArgument(f"file_name {name!r} is not a PNG, JPEG or WebP image", field=where)
        captions[file.relative_to(folder.resolve()).as_posix()] = text.strip()
    return captions


def _caption_file(image: Path) -> str | None:
    text_file = image.with_suffix(".txt")
    if not text_file.is_file():
        return None
    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"cannot read as UTF-8 text ({error})", field=str(text_file)) from None
    return text.strip()


def load_folder(path: Path, resolution: int, caption: str | None = None, *, flag: str = "--data",
                max_pixels: int = MAX_PIXELS) -> CaptionedImages:
    """Read a kohya or imagefolder-layout folder into square `resolution` images with captions.

    `flag` names the option the folder came from in errors about the folder itself.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InvalidArgument(f"{folder} is not a directory", field=flag)
    if resolution < 8:
        raise InvalidArgument(f"must be at least 8 pixels (got {resolution})", field="--resolution")
    from_metadata = _metadata_captions(folder)
    files = sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    listed = {folder / name for name in from_metadata}
    files = sorted(set(files) | listed)
    if not files:
        raise InvalidArgument(f"{folder} holds no PNG, JPEG or WebP images", field=flag)
    images, captions, names = [], [], []
    for file in files:
        name = file.relative_to(folder).as_posix()
        text = caption if caption is not None else from_metadata.get(name)
        if text is None:
            text = _caption_file(file)
        if text is None:
            raise InvalidArgument(
                f"no caption (write {file.with_suffix('.txt').name}, list it in {METADATA_FILE}, "
                "or give one caption for all with --caption)", field=str(file),
            )
        if len(text) > MAX_CAPTION_CHARS:
            raise InvalidArgument(f"caption longer than {MAX_CAPTION_CHARS} characters", field=str(file))
        pixels = np.asarray(square(read_image(file, max_pixels), resolution))  # [R, R, 3] uint8
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))  # [3, R, R]
        captions.append(text)
        names.append(name)
    return CaptionedImages(images=torch.stack(images), captions=tuple(captions), files=tuple(names), root=folder)


def load_masks(path: Path, data: CaptionedImages, *, flag: str = "--mask-data") -> CaptionedImages:
    """`data` with a loss mask per image: the image in `path` whose name stem is the image's
    (any of IMAGE_SUFFIXES), as luminance in [0, 1], resized and cropped as the image was."""
    folder = Path(path)
    if not folder.is_dir():
        raise InvalidArgument(f"{folder} is not a directory", field=flag)
    by_stem: dict[str, Path] = {}
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith("."):
            by_stem.setdefault(file.stem, file)
    masks = []
    for name in data.files:
        stem = Path(name).stem
        file = by_stem.get(stem)
        if file is None:
            raise InvalidArgument(f"no mask for {name} (expected {stem}.png or another image named {stem})",
                                  field=flag)
        grey = square(read_image(file), data.resolution).convert("L")
        mask = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)  # [R, R]
        if float(mask.max()) == 0.0:
            raise InvalidArgument(f"the mask for {name} is all black: nothing of the image would count",
                                  field=str(file))
        masks.append(mask[None])  # [1, R, R]
    return replace(data, masks=torch.stack(masks))


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, R, R] -> float32 [N, 3, R, R] in [-1, 1], as SD's VAE expects."""
    return images.float() / 127.5 - 1.0
