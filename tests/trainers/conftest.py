"""Tiny base models (built from configs, never downloaded) and captioned folders written per test."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdserve.trainers.components import Components, load_components


def write_folder(
    folder: Path,
    count: int = 3,
    size: tuple[int, int] = (40, 48),  # (width, height)
    layout: str = "kohya",
    caption: str = "a photo of sks dog",
    seed: int = 0,
) -> Path:
    """`count` random RGB PNGs with captions "<caption> <i>", as .txt files (kohya) or a
    metadata.jsonl (diffusers imagefolder)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        if layout == "kohya":
            (folder / f"img{i}.txt").write_text(f"{caption} {i}\n")
        else:
            lines.append(json.dumps({"file_name": f"img{i}.png", "text": f"{caption} {i}"}))
    if layout != "kohya":
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`sdserve ARGS` in process: (exit code, stdout, stderr), whether main returns or exits."""
    from sdserve.cli.main import main

    try:
        code = main([*args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def _bases() -> dict[str, Components]:
    return {}


def fresh(bases: dict[str, Components], model: str) -> Components:
    """A private copy of a tiny model's trainable modules (methods wrap them in place); the VAE
    and tokenizers, never modified, are shared."""
    if model not in bases:
        bases[model] = load_components(model)
    base = bases[model]
    return dataclasses.replace(
        base, unet=copy.deepcopy(base.unet), text_encoders=[copy.deepcopy(t) for t in base.text_encoders]
    )


@pytest.fixture
def sd1(_bases) -> Components:
    return fresh(_bases, "tiny-sd1")


@pytest.fixture
def components_of(_bases):
    return lambda model: fresh(_bases, model)


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "data")
