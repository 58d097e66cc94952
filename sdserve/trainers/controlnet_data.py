"""ControlNet training data: image, conditioning image and caption triplets.

The layout diffusers' `train_controlnet.py` reads from an imagefolder: a `metadata.jsonl` whose
lines are `{"file_name": ..., "conditioning_file_name": ..., "text": ...}`, both paths relative
to the folder (e.g. `images/0.png` and `conditioning_images/0.png`, as the fill50k set has them).

Images go through `data.read_image` (the server's header checks, EXIF orientation) and
`data.square`. An image and its conditioning image must have the same size: a control map is
read pixel for pixel against its image, and resizing one of them to fit would silently shift
what it marks. Errors are one line naming the file or the metadata line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdserve.errors import InvalidArgument
from sdserve.trainers.data import (
    IMAGE_SUFFIXES,
    MAX_CAPTION_CHARS,
    MAX_PIXELS,
    METADATA_FILE,
    CaptionedImages,
    read_image,
    square,
)

FIELDS = ("file_name", "conditioning_file_name", "text")


@dataclass(frozen=True)
class ControlTriplets(CaptionedImages):
    """CaptionedImages whose image i has the control map `conditioning[i]` (same side)."""

    conditioning: torch.Tensor  # [N, 3, R, R] uint8


def _file(folder: Path, name: object, key: str, where: str) -> Path:
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{key} must be a non-empty string", field=where)
    file = (folder / name).resolve()
    if not file.is_relative_to(folder.resolve()) or not file.is_file():
        raise InvalidArgument(f"{key} {name!r} is not a file in {folder}", field=where)
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        raise InvalidArgument(f"{key} {name!r} is not a PNG, JPEG or WebP image", field=where)
    return file


def _pixels(image, resolution: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(square(image, resolution)).copy()).permute(2, 0, 1)  # [3, R, R] uint8


@dataclass(frozen=True)
class _Entry:
    image: Path
    control: Path
    text: object  # checked to be a string when used (a --caption replaces it)
    where: str  # "metadata.jsonl line N", for messages


def _entries(folder: Path, flag: str) -> list[_Entry]:
    """The metadata's lines, their two files checked to exist in the folder."""
    if not folder.is_dir():
        raise InvalidArgument(f"{folder} is not a directory", field=flag)
    metadata = folder / METADATA_FILE
    if not metadata.is_file():
        raise InvalidArgument(f"{folder} has no {METADATA_FILE} (lines of {{\"file_name\", "
                              "\"conditioning_file_name\", \"text\"}, as diffusers' ControlNet example reads)",
                              field=flag)
    try:
        lines = metadata.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"cannot read ({error})", field=str(metadata)) from None
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{metadata} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise InvalidArgument("not valid JSON", field=where) from None
        if not isinstance(entry, dict):
            raise InvalidArgument(f"expected a JSON object with {', '.join(FIELDS)}", field=where)
        entries.append(_Entry(_file(folder, entry.get("file_name"), "file_name", where),
                              _file(folder, entry.get("conditioning_file_name"), "conditioning_file_name", where),
                              entry.get("text"), where))
    if not entries:
        raise InvalidArgument(f"{metadata} lists no images", field=flag)
    return entries


def _check_sizes(entry: _Entry, folder: Path, image: tuple[int, int], control: tuple[int, int]) -> None:
    if image != control:
        names = [p.relative_to(folder.resolve()).as_posix() for p in (entry.control, entry.image)]
        raise InvalidArgument(f"conditioning image {names[0]} is {control[0]}x{control[1]}, its image {names[1]} is "
                              f"{image[0]}x{image[1]}; they must be the same size", field=entry.where)


def check_control_folder(path: Path, flag: str = "--data") -> int:
    """Refuse, before a model loads, a folder whose metadata or files are missing or whose image
    pairs differ in size (read from the image headers); -> the number of triplets."""
    folder = Path(path)
    if not folder.is_dir():
        raise InvalidArgument(f"{folder} is not a directory", field=flag)
    entries = _entries(folder, flag)
    for entry in entries:
        try:
            with Image.open(entry.image) as image, Image.open(entry.control) as control:
                sizes = (image.size, control.size)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # unreadable: load_control_folder names it with the server's checks
        _check_sizes(entry, folder, *sizes)
    return len(entries)


def load_control_folder(path: Path, resolution: int, caption: str | None = None, *, flag: str = "--data",
                        max_pixels: int = MAX_PIXELS) -> ControlTriplets:
    """Read a ControlNet folder (see the module docstring) into square `resolution` triplets, in
    the metadata's line order; `caption` replaces every line's text."""
    folder = Path(path)
    if not folder.is_dir():
        raise InvalidArgument(f"{folder} is not a directory", field=flag)
    images, controls, captions, names = [], [], [], []
    for entry in _entries(folder, flag):
        where = entry.where
        text = caption if caption is not None else entry.text
        if not isinstance(text, str):
            raise InvalidArgument("text must be a string", field=where)
        if len(text) > MAX_CAPTION_CHARS:
            raise InvalidArgument(f"text longer than {MAX_CAPTION_CHARS} characters", field=where)
        image, control = read_image(entry.image, max_pixels), read_image(entry.control, max_pixels)
        _check_sizes(entry, folder, image.size, control.size)
        images.append(_pixels(image, resolution))
        controls.append(_pixels(control, resolution))
        captions.append(text.strip())
        names.append(entry.image.relative_to(folder.resolve()).as_posix())
    return ControlTriplets(images=torch.stack(images), captions=tuple(captions), files=tuple(names), root=folder,
                           conditioning=torch.stack(controls))
