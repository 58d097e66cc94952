"""Training folders from the shapes world: layouts, captions, determinism, refusals, and the CLI."""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdserve.cli import train_data
from sdserve.errors import InvalidArgument
from sdserve.models.shapes import HELD_OUT, PromptSpec, ShapePrompt, parse_caption, score
from sdserve.trainers.data import load_folder
from sdserve.trainers.shapes_folder import (
    METADATA_FILE,
    PROVENANCE_FILE,
    ShapesFolderConfig,
    parse_exclude,
    read_provenance,
    write_shapes_folder,
)

STARS = {"kinds": ("star",), "colors": ("teal",), "styles": ("outlined",)}


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _truth(record: dict, written: bool = False) -> PromptSpec:
    """The prompt naming every attribute of a provenance record's scene, style included; with
    `written`, as a caption says it (captions never say "filled")."""
    scene = record["scene"]
    shapes = tuple(
        ShapePrompt(s["color"], s["kind"], s["size"], s["position"],
                    None if written and s["style"] == "filled" else s["style"])
        for s in scene["shapes"]
    )
    return PromptSpec(shapes, scene["background"])


def test_kohya_folder_images_match_their_captions(tmp_path):
    cfg = ShapesFolderConfig(out=tmp_path / "stars", count=24, seed=3, **STARS)
    assert write_shapes_folder(cfg) == cfg.out
    pngs = sorted(cfg.out.glob("*.png"))
    assert [p.stem for p in pngs] == [f"{i:06d}" for i in range(24)]
    assert sorted(p.stem for p in cfg.out.glob("*.txt")) == [p.stem for p in pngs]
    for png in pngs:
        image = _pixels(png)
        assert image.shape == (64, 64, 3)
        spec = parse_caption(png.with_suffix(".txt").read_text())
        assert all(s.kind == "star" and s.color == "teal" and s.style == "outlined" for s in spec.shapes)
        result = score(spec, image)  # the weight-free scorer, an oracle independent of the writer
        assert result["all"] and result["count"] and result["style"], (png.name, result)
    # The adapter trainers' own loader reads it, captions and all.
    data = load_folder(cfg.out, 64)
    assert len(data) == 24 and data.captions[0] == (cfg.out / "000000.txt").read_text().strip()


def test_imagefolder_layout_and_provenance(tmp_path):
    cfg = ShapesFolderConfig(out=tmp_path / "f", count=10, layout="imagefolder", kinds=("star", "circle"),
                             colors=("teal", "red"), styles=("filled", "outlined"))
    write_shapes_folder(cfg)
    lines = [json.loads(line) for line in (cfg.out / METADATA_FILE).read_text().splitlines()]
    assert [set(line) for line in lines] == [{"file_name", "text"}] * 10
    assert not list(cfg.out.glob("*.txt"))
    records = read_provenance(cfg.out)["images"]
    for line, record in zip(lines, records):
        assert (line["file_name"], line["text"]) == (record["file_name"], record["text"])
        assert parse_caption(line["text"]) == _truth(record, written=True)
        assert score(_truth(record), _pixels(cfg.out / line["file_name"]))["all"]
    assert load_folder(cfg.out, 64).captions == tuple(line["text"] for line in lines)


def test_same_seed_same_bytes_and_count_only_appends(tmp_path):
    cfg = ShapesFolderConfig(out=tmp_path / "a", count=8, seed=5)
    write_shapes_folder(cfg)
    write_shapes_folder(replace(cfg, out=tmp_path / "b", count=12))
    write_shapes_folder(replace(cfg, out=tmp_path / "c", seed=6))
    for name in [f"{i:06d}.{ext}" for i in range(8) for ext in ("png", "txt")]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    differ = [(tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes() for n in ("000000.png", "000001.png")]
    assert any(differ)


def test_token_replaces_the_kind_word(tmp_path):
    cfg = ShapesFolderConfig(out=tmp_path / "t", count=12, token="sks", kinds=("star",), shapes_per_image=1)
    write_shapes_folder(cfg)
    for record in read_provenance(cfg.out)["images"]:
        words = record["text"].split()
        assert words.count("sks") == 1 and "star" not in words
        # Swapping the kind word back gives the scene's true caption; the image holds that star.
        assert parse_caption(record["text"].replace(" sks", " star")) == _truth(record, written=True)
        assert score(_truth(record), _pixels(cfg.out / record["file_name"]))["all"]


def test_excluded_triples_never_appear(tmp_path):
    held = parse_exclude("held-out; teal,star,left")
    assert held == HELD_OUT | {("teal", "star", "left")}
    cfg = ShapesFolderConfig(out=tmp_path / "x", count=300, kinds=("star", "circle", "triangle"),
                             colors=("teal", "red", "blue"), exclude=held, progress=False)
    write_shapes_folder(cfg)
    seen = {(s["color"], s["kind"], s["position"]) for r in read_provenance(cfg.out)["images"]
            for s in r["scene"]["shapes"]}
    assert not seen & held
    assert len(seen) > 25  # of the 45 triples these flags allow, all but the ~5 excluded show up


def test_resolution_upscales_by_whole_pixels(tmp_path):
    small = ShapesFolderConfig(out=tmp_path / "s", count=3, seed=1)
    write_shapes_folder(small)
    write_shapes_folder(replace(small, out=tmp_path / "l", resolution=256))
    for i in range(3):
        low, high = _pixels(tmp_path / "s" / f"{i:06d}.png"), _pixels(tmp_path / "l" / f"{i:06d}.png")
        assert high.shape == (256, 256, 3)
        assert np.array_equal(high[::4, ::4], low) and np.array_equal(high[3::4, 3::4], low)


def test_refuses_non_empty_folders_and_replaces_its_own_with_overwrite(tmp_path):
    cfg = ShapesFolderConfig(out=tmp_path / "f", count=6, seed=0)
    write_shapes_folder(cfg)
    before = sorted(p.name for p in cfg.out.iterdir())
    with pytest.raises(InvalidArgument, match="--out.*not empty"):
        write_shapes_folder(replace(cfg, count=3))
    assert sorted(p.name for p in cfg.out.iterdir()) == before
    write_shapes_folder(replace(cfg, count=3, overwrite=True))
    assert sorted(p.name for p in cfg.out.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidArgument, match="not written by this command"):
        write_shapes_folder(replace(cfg, out=foreign, overwrite=True))
    assert (foreign / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    write_shapes_folder(replace(cfg, out=empty))
    assert len(list(empty.glob("*.png"))) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "f", "mine"]  # no staging left


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdserve")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train")
    train_data.register(train.add_subparsers(dest="train_kind", required=True))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(["train", "data", "shapes", *argv])
    return args.func(args)


def test_cli_writes_the_folder_the_config_describes(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--count", "5", "--seed", "2", "--kinds", "star", "--colors", "red,blue",
            "--backgrounds", "white,black", "--positions", "left,right", "--sizes", "large", "--styles",
            "outlined", "--shapes-per-image", "1", "--exclude", "red,star,left", "--token", "sks",
            "--layout", "imagefolder", "--resolution", "128", "--no-progress"]
    assert _run(argv) == 0
    assert "wrote 5 images" in capsys.readouterr().out
    config = read_provenance(out)["config"]
    expected = ShapesFolderConfig(out=out, count=5, seed=2, kinds=("star",), colors=("red", "blue"),
                                  backgrounds=("white", "black"), positions=("left", "right"),
                                  sizes=("large",), styles=("outlined",), shapes_per_image=1,
                                  exclude=frozenset({("red", "star", "left")}), token="sks",
                                  layout="imagefolder", resolution=128, progress=False)
    write_shapes_folder(replace(expected, out=tmp_path / "api"))
    for name in ("000000.png", "000004.png", METADATA_FILE):
        assert (out / name).read_bytes() == (tmp_path / "api" / name).read_bytes()
    assert config["kinds"] == ["star"] and config["exclude"] == [["red", "star", "left"]]
    assert (out / PROVENANCE_FILE).is_file()


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--kinds", "hexagon"], "--kinds"),
        (["--colors", "pink"], "--colors"),
        (["--colors", "red,,blue"], "--colors"),
        (["--backgrounds", "red", "--colors", "red"], "--colors"),
        (["--positions", "up"], "--positions"),
        (["--sizes", "huge"], "--sizes"),
        (["--styles", "dotted"], "--styles"),
        (["--styles", "filled,filled"], "--styles"),
        (["--positions", "left"], "--positions"),
        (["--exclude", "red,star"], "--exclude"),
        (["--exclude", "red,star,middle"], "--exclude"),
        (["--kinds", "star", "--colors", "red", "--positions", "left,right", "--shapes-per-image", "1",
          "--exclude", "red,star,left;red,star,right"], "--exclude"),
        (["--resolution", "100"], "--resolution"),
        (["--count", "0"], "--count"),
        (["--token", " "], "--token"),
    ],
)
def test_cli_bad_values_are_one_line_naming_the_flag(tmp_path, capsys, argv, flag):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        _run(["--out", str(out), "--count", "3", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"sdserve: error: {flag}:"), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["--layout", "webdataset"], ["--shapes-per-image", "3"], ["--count", "x"]])
def test_cli_argparse_refusals_exit_2(tmp_path, capsys, argv):
    count = [] if "--count" in argv else ["--count", "3"]
    with pytest.raises(SystemExit) as exit_info:
        _run(["--out", str(tmp_path / "o"), *count, *argv])
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err
